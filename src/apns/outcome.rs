//! What one answer from Apple means for the notification and the token.

use http::StatusCode;

/// The classification of one response, which the sender acts on: retry,
/// remove the token, mint a new provider token, or give up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// The token will never work again (410, or 400 BadDeviceToken).
    DeadToken {
        reason: String,
    },
    /// Our provider token was refused (403 on token auth); mint a new one.
    ExpiredProviderToken {
        reason: String,
    },
    /// Apple or the network may do better later (429, 5xx, no answer).
    Retry {
        reason: String,
    },
    /// Our request is wrong; sending it again will not help.
    Rejected {
        reason: String,
    },
}

impl Outcome {
    /// Classifies a status and Apple's `reason`.
    pub fn classify(status: StatusCode, reason: &str) -> Outcome {
        let reason = reason.to_owned();
        match status.as_u16() {
            200 => Outcome::Delivered,
            410 => Outcome::DeadToken { reason },
            400 if matches!(reason.as_str(), "BadDeviceToken" | "DeviceTokenNotForTopic") => {
                Outcome::DeadToken { reason }
            }
            403 if matches!(
                reason.as_str(),
                "ExpiredProviderToken" | "InvalidProviderToken"
            ) =>
            {
                Outcome::ExpiredProviderToken { reason }
            }
            429 | 500..=599 => Outcome::Retry { reason },
            _ => Outcome::Rejected { reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let c = |s: u16, r: &str| Outcome::classify(StatusCode::from_u16(s).unwrap(), r);
        assert_eq!(c(200, ""), Outcome::Delivered);
        assert!(matches!(c(410, "Unregistered"), Outcome::DeadToken { .. }));
        assert!(matches!(
            c(400, "BadDeviceToken"),
            Outcome::DeadToken { .. }
        ));
        assert!(matches!(c(400, "BadTopic"), Outcome::Rejected { .. }));
        assert!(matches!(
            c(403, "ExpiredProviderToken"),
            Outcome::ExpiredProviderToken { .. }
        ));
        assert!(matches!(c(403, "BadCertificate"), Outcome::Rejected { .. }));
        assert!(matches!(c(429, "TooManyRequests"), Outcome::Retry { .. }));
        assert!(matches!(
            c(503, "ServiceUnavailable"),
            Outcome::Retry { .. }
        ));
    }
}
