//! Pod patterns of the operator commands: a glob over `<namespace>.<cluster>`, optionally
//! followed by `#<seq>` to pick one pod.

/// A parsed pod pattern.
#[derive(Debug)]
pub struct Pattern {
    text: String,
    cluster: glob::Pattern,
    seq: Option<i64>,
}

impl Pattern {
    /// Parses `glob[#seq]`, or returns a message naming what is expected.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        // Namespace and cluster names are letters, digits, `-` and `_`, so a pattern with
        // whitespace could only ever match nothing.
        if text.chars().any(char::is_whitespace) {
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            return Err(format!(
                "invalid pattern `{text}`: it contains whitespace, which no namespace, cluster or \
                 seq has; write it without spaces, as `{compact}`"
            ));
        }
        let (glob_text, seq) = match text.rsplit_once('#') {
            Some((glob_text, seq_text)) => {
                let seq = seq_text.parse::<i64>().ok().filter(|seq| *seq >= 0).ok_or_else(|| {
                    format!("invalid pattern `{text}`: `{seq_text}` after `#` is not a pod seq (a whole number)")
                })?;
                (glob_text, Some(seq))
            }
            None => (text, None),
        };
        if glob_text.is_empty() {
            return Err(format!(
                "invalid pattern `{text}`: expected a glob over <namespace>.<cluster> before `#`"
            ));
        }
        let cluster = glob::Pattern::new(glob_text)
            .map_err(|error| format!("invalid pattern `{text}`: {error}"))?;
        Ok(Pattern {
            text: text.to_string(),
            cluster,
            seq,
        })
    }

    pub fn matches_cluster(&self, qualified: &str) -> bool {
        self.cluster.matches(qualified)
    }

    pub fn matches_seq(&self, seq: i64) -> bool {
        self.seq.is_none_or(|wanted| wanted == seq)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_over_qualified_cluster() {
        let pattern = Pattern::parse("shop.*").unwrap();
        assert!(pattern.matches_cluster("shop.redis"));
        assert!(pattern.matches_cluster("shop.staging.redis"));
        assert!(!pattern.matches_cluster("ops.redis"));
        assert!(pattern.matches_seq(3));

        let pattern = Pattern::parse("*.redis").unwrap();
        assert!(pattern.matches_cluster("shop.redis"));
        assert!(!pattern.matches_cluster("shop.redis-2"));
    }

    #[test]
    fn seq_suffix_picks_one_pod() {
        let pattern = Pattern::parse("shop.redis#12").unwrap();
        assert!(pattern.matches_cluster("shop.redis"));
        assert!(pattern.matches_seq(12));
        assert!(!pattern.matches_seq(1));
    }

    #[test]
    fn invalid_patterns_rejected() {
        for (text, expected) in [
            ("shop.redis#x", "is not a pod seq"),
            ("shop.redis#-1", "is not a pod seq"),
            ("#3", "expected a glob"),
            ("shop.[", "invalid pattern `shop.[`"),
            ("shop.redis #1", "as `shop.redis#1`"),
            (" shop.redis", "contains whitespace"),
        ] {
            let error = Pattern::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
