//! A small PEM reader that, unlike rustls-pemfile, keeps `ENCRYPTED PRIVATE
//! KEY` blocks and the `Proc-Type`/`DEK-Info` headers of OpenSSL's legacy
//! key encryption.

use base64::Engine;

/// One `-----BEGIN <label>-----` block.
pub(crate) struct Block {
    pub label: String,
    /// `DEK-Info` of a `Proc-Type: 4,ENCRYPTED` block: OpenSSL's legacy
    /// key encryption, e.g. `AES-256-CBC,<iv hex>`.
    pub legacy_encrypted: Option<String>,
    pub der: Vec<u8>,
}

/// Every block in `text`, in order; text between blocks is ignored.
pub(crate) fn blocks(text: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let label_end = after
            .find("-----")
            .ok_or("PEM BEGIN line is not terminated")?;
        let label = after[..label_end].to_owned();
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let body_end = body_start
            .find(&end_marker)
            .ok_or_else(|| format!("PEM block {label} has no END line"))?;
        let (mut encrypted, mut dek_info) = (false, None);
        let mut b64 = String::new();
        for line in body_start[..body_end].lines().map(str::trim) {
            if let Some((name, value)) = line.split_once(':') {
                match name.trim() {
                    "Proc-Type" => encrypted = value.contains("ENCRYPTED"),
                    "DEK-Info" => dek_info = Some(value.trim().to_owned()),
                    _ => {}
                }
            } else {
                b64.push_str(line);
            }
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("PEM block {label} is not valid base64: {e}"))?;
        let legacy_encrypted = encrypted.then(|| dek_info.unwrap_or_default());
        out.push(Block {
            label,
            legacy_encrypted,
            der,
        });
        rest = &body_start[body_end + end_marker.len()..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_blocks_and_headers() {
        let text = "junk\n-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n\
                    -----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\nBAU=\n-----END RSA PRIVATE KEY-----\n";
        let b = blocks(text).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].label.as_str(), b[0].der.as_slice()),
            ("CERTIFICATE", &[1u8, 2, 3][..])
        );
        assert_eq!(b[0].legacy_encrypted, None);
        assert_eq!(b[1].label, "RSA PRIVATE KEY");
        assert_eq!(b[1].legacy_encrypted.as_deref(), Some("AES-256-CBC,00"));
        assert_eq!(b[1].der, vec![4, 5]);
    }

    #[test]
    fn broken_block_is_an_error() {
        assert!(blocks("-----BEGIN CERTIFICATE-----\nAQID\n").is_err());
        assert!(blocks("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----").is_err());
        assert!(blocks("nothing here").unwrap().is_empty());
    }
}
