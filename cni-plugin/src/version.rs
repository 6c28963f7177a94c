//! The CNI spec versions this plugin speaks.

/// What VERSION reports, oldest first. 0.4.0 is the oldest with CHECK and a `prevResult` on DEL,
/// which a chained plugin relies on.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The version used for replies when the request's own version is unknown (e.g. stdin did not
/// parse).
pub const NEWEST: &str = "1.1.0";

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_is_supported_and_last() {
        assert!(is_supported(NEWEST));
        assert_eq!(SUPPORTED_VERSIONS.last(), Some(&NEWEST));
        assert!(!is_supported("0.3.1"));
        assert!(!is_supported("1.1"));
    }
}
