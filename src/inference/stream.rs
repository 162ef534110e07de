//! Turning generated token bytes into streamed text: whole UTF-8 characters only, and never a
//! byte of a stop string.
//!
//! A token's bytes can end in the middle of a multi-byte character, and a stop string can span
//! several tokens. [`TextStream`] holds back an incomplete character, and the longest tail that
//! could still become the start of a stop string, until the next token settles it.

/// What one push produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pushed {
    /// Text safe to send now (may be empty).
    pub text: String,
    /// Whether a stop string was found; generation should end (the stop string is not in `text`).
    pub stopped: bool,
}

/// Incremental decoder with stop-string detection.
#[derive(Debug, Clone)]
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    /// Decoded text not yet sent because it might be the start of a stop string.
    held: String,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            partial: Vec::new(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds a token's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        if self.stopped {
            return Pushed {
                text: String::new(),
                stopped: true,
            };
        }
        self.partial.extend_from_slice(bytes);
        let decoded = take_complete_utf8(&mut self.partial);
        self.held.push_str(&decoded);
        // A stop string anywhere in what is held ends the stream there.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.partial.clear();
            self.stopped = true;
            return Pushed {
                text,
                stopped: true,
            };
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Pushed {
            text,
            stopped: false,
        }
    }

    /// Ends the stream: returns whatever was held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let mut out = std::mem::take(&mut self.held);
        if !self.partial.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
        out
    }
}

/// Removes and decodes the longest valid UTF-8 prefix of `buf`, leaving an incomplete trailing
/// character in place. Invalid bytes (not just incomplete) become U+FFFD.
fn take_complete_utf8(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(buf) {
            Ok(s) => {
                out.push_str(s);
                buf.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // SAFETY-free: the prefix is valid by construction.
                out.push_str(std::str::from_utf8(&buf[..valid]).unwrap_or_default());
                match e.error_len() {
                    // Incomplete character at the end: wait for more bytes.
                    None => {
                        buf.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        buf.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, on a
/// character boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(chunks: &[&[u8]], stops: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stops);
        let mut out = String::new();
        for c in chunks {
            let p = s.push(c);
            out.push_str(&p.text);
            if p.stopped {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn multibyte_characters_split_across_tokens() {
        let snow = "☃".as_bytes();
        let (text, _) = run(&[b"a", &snow[..1], &snow[1..2], &snow[2..], b"b"], &[]);
        assert_eq!(text, "a☃b");
        let mut s = TextStream::new(&[]);
        assert_eq!(s.push(&snow[..2]).text, "");
        assert_eq!(s.push(&snow[2..]).text, "☃");
    }

    #[test]
    fn stop_strings_across_tokens_are_not_streamed() {
        assert_eq!(
            run(&[b"hello ", b"wor", b"ld and more"], &["world"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&[b"x</", b"s>y"], &["</s>"]), ("x".into(), true));
        // A held prefix that turns out not to be a stop string is released.
        assert_eq!(
            run(&[b"wor", b"k done"], &["world"]),
            ("work done".into(), false)
        );
        // The earliest of several stop strings wins.
        assert_eq!(run(&[b"a;b\n"], &["\n", ";"]), ("a".into(), true));
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[b"a\xffb"], &[]), ("a\u{FFFD}b".into(), false));
        assert_eq!(run(&[b"a\xe2\x98"], &[]), ("a\u{FFFD}".into(), false));
    }

    proptest! {
        /// However the bytes of a text are split into tokens, the streamed text is the same.
        #[test]
        fn split_points_do_not_matter(text in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..10)) {
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&bytes[last..p]);
                last = p;
            }
            chunks.push(&bytes[last..]);
            let (out, stopped) = run(&chunks, &[]);
            prop_assert!(!stopped);
            prop_assert_eq!(out, text);
        }

        /// With a stop string, the output is exactly the text before its first occurrence.
        #[test]
        fn output_is_the_text_before_the_stop(text in "[ab]{0,30}", stop in "[ab]{1,3}", cut in 0usize..30) {
            let bytes = text.as_bytes();
            let c = cut.min(bytes.len());
            let (out, stopped) = run(&[&bytes[..c], &bytes[c..]], &[stop.as_str()]);
            match text.find(&stop) {
                Some(i) => { prop_assert!(stopped); prop_assert_eq!(out, &text[..i]); }
                None => { prop_assert!(!stopped); prop_assert_eq!(out, text); }
            }
        }
    }
}
