//! `--stop` strings over streamed text. A stop string may span several pushed pieces, so the
//! matcher holds back exactly the tail that could still grow into one, emits everything else
//! at once, and never emits the stop string itself (as vLLM and the OpenAI API do).

/// What one [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStep {
    /// Text that is now safe to show.
    pub emit: String,
    /// A stop string was completed: generation should end (finish reason `stop`).
    pub stopped: bool,
}

/// Finds the first occurrence of any stop string in the concatenated pieces.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted: a suffix that is a proper prefix of some stop.
    held: String,
    /// Index into `stops` of the string that ended generation.
    matched: Option<usize>,
}

impl StopMatcher {
    /// Empty strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            matched: None,
        }
    }

    /// Feeds the next piece of generated text. After a stop, everything is swallowed.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.matched.is_some() {
            return StopStep {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopStep {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        // The earliest occurrence wins; at equal starts the earlier-listed stop is reported.
        let hit = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| buf.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = hit {
            self.matched = Some(i);
            buf.truncate(pos);
            return StopStep {
                emit: buf,
                stopped: true,
            };
        }
        let keep = self.holdback_len(&buf);
        self.held = buf.split_off(buf.len() - keep);
        StopStep {
            emit: buf,
            stopped: false,
        }
    }

    /// Releases the held tail at the end of generation (it never completed a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// True once a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string that ended generation, if any.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Length in bytes of the longest suffix of `buf` that is a proper prefix of a stop
    /// string (and so may still become one). `buf` contains no full stop string.
    fn holdback_len(&self, buf: &str) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            // Suffixes start on char boundaries; try the longest ones first.
            let first = buf.len() - (stop.len() - 1).min(buf.len());
            for start in (first..buf.len()).filter(|&i| buf.is_char_boundary(i)) {
                let suffix = &buf[start..];
                if suffix.len() <= best {
                    break;
                }
                if stop.starts_with(suffix) {
                    best = suffix.len();
                    break;
                }
            }
        }
        best
    }
}

/// Cuts `text` before the earliest occurrence of any non-empty stop string; `None` when no stop
/// string occurs. For one-shot (non-streamed) text such as a batch result.
pub fn truncate_at_stop<'a>(text: &'a str, stops: &[String]) -> Option<(&'a str, usize)> {
    stops
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .filter_map(|(i, s)| text.find(s.as_str()).map(|pos| (pos, i)))
        .min()
        .map(|(pos, i)| (&text[..pos], i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out += &step.emit;
            if step.stopped {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn holds_back_only_a_possible_stop_prefix() {
        let mut m = StopMatcher::new(vec!["</end>".into()]);
        let step = m.push("abc</e");
        assert_eq!(step.emit, "abc");
        assert!(!step.stopped);
        let step = m.push("x");
        assert_eq!(step.emit, "</ex");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn holdback_len_never_splits_a_char() {
        let m = StopMatcher::new(vec!["éa".into()]);
        assert_eq!(m.holdback_len("xxé"), "é".len());
        assert_eq!(m.holdback_len("xx"), 0);
        let m = StopMatcher::new(vec!["aé".into()]);
        assert_eq!(m.holdback_len("\u{e9}"), 0);
        // The byte window of a short stop may start inside a multi-byte char.
        let m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.holdback_len("xé"), 0);
        assert_eq!(m.holdback_len("éa"), 1);
    }

    #[test]
    fn earliest_stop_wins_and_is_reported() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        let step = m.push("hello world");
        assert_eq!(step.emit, "hel");
        assert!(step.stopped);
        assert_eq!(m.matched(), Some("lo"));
        assert_eq!(
            m.push("more"),
            StopStep {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn no_stops_passes_text_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), false));
        assert_eq!(run(&[""], &["a", "b"]), ("ab".to_string(), false));
    }

    #[test]
    fn overlapping_prefixes_are_resolved() {
        // "aab" where the stop is "ab": the first "a" is released once "aa" shows it cannot start
        // the match at that position.
        assert_eq!(run(&["ab"], &["a", "a", "b"]), ("a".to_string(), true));
        assert_eq!(
            run(&["abab"], &["ab", "a", "c"]),
            ("abac".to_string(), false)
        );
        assert_eq!(run(&["abab"], &["ab", "a", "bab"]), ("".to_string(), true));
    }

    #[test]
    fn truncate_at_stop_cuts_at_the_earliest() {
        let stops = vec!["b".to_string(), "a".to_string(), String::new()];
        assert_eq!(truncate_at_stop("xxab", &stops), Some(("xx", 1)));
        assert_eq!(truncate_at_stop("xx", &stops), None);
    }
}
