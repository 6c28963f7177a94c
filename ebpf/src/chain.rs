//! One line for an error and its causes, for log lines, CNI replies and test
//! failures outside anyhow (whose `{:#}` does the same for its own errors).

use std::error::Error;

/// `err` and each of its sources, joined with ": ".
pub fn error_chain(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {what}")]
    struct Outer {
        what: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn joins_the_error_and_every_source() {
        let inner = std::io::Error::other("permission denied");
        assert_eq!(error_chain(&inner), "permission denied");
        let outer = Outer {
            what: "mb_pods",
            source: inner,
        };
        assert_eq!(error_chain(&outer), "cannot open mb_pods: permission denied");
    }
}
