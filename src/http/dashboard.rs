//! `GET /`: one self-contained page for operators (live counters, push
//! rate chart, certificate expiry, a test-push form). It ships inside the
//! binary so there is nothing to build, install or fetch at run time.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use base64::Engine;

const PAGE: &str = include_str!("dashboard.html");

/// Allows only the page's own inline script and style (by hash) and fetches
/// to this origin, so nothing injected into the page can run or phone out.
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(inline(PAGE, "script")),
        hash(inline(PAGE, "style")),
    )
});

/// The text of the page's single `<tag>` element, exactly as the browser hashes it.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).map(|i| i + open.len());
    let end = page.find(&format!("</{tag}>"));
    match (start, end) {
        (Some(s), Some(e)) if s <= e => &page[s..e],
        _ => "",
    }
}

fn hash(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_one_inline_script_and_style_and_no_external_urls() {
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "<{tag}>");
            assert!(inline(PAGE, tag).len() > 100, "<{tag}> is empty");
        }
        assert!(
            !PAGE.contains("://"),
            "the page must not name another origin"
        );
        assert!(
            !PAGE.contains(" style="),
            "style attributes are blocked by the CSP"
        );
        let handler = PAGE.split(" on").skip(1).any(|rest| {
            let name = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            name.len() < rest.len() && name.starts_with('=')
        });
        assert!(
            !handler,
            "inline handlers (onclick=...) are blocked by the CSP"
        );
    }

    #[test]
    fn csp_pins_the_inline_blocks_by_hash() {
        assert!(CSP.contains(&hash(inline(PAGE, "script"))));
        assert!(!CSP.contains("unsafe-inline"));
        assert!(!CSP.contains("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="));
    }
}
