//! Incremental, UTF-8-safe detokenization of a generated id stream.
//!
//! Each step decodes a short window of ids with the tokenizer's own decoder and emits only
//! the text past what the window's already-emitted part decodes to (the prefix/read-offset
//! method of TGI and vLLM). Decoding a window rather than single tokens keeps the decoder's
//! context-dependent rules right (SentencePiece's `▁` at the start, byte-fallback runs,
//! byte-level merges), and text is held back only while it ends in U+FFFD, i.e. while a
//! multi-byte character is still incomplete. So the pieces concatenate to
//! `tokenizer.decode(all_ids, skip_special_tokens)`; see [`Detokenizer`] for the one case
//! where they cannot.

use std::sync::Arc;

use anyhow::anyhow;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

const REPLACEMENT: char = '\u{FFFD}';

/// Turns generated ids into text pieces as soon as they are valid UTF-8.
///
/// The concatenation of every [`push`](Self::push) and the final [`finish`](Self::finish)
/// equals `tokenizer.decode(ids, skip_special_tokens)` of all pushed ids, with one exception
/// no streaming decoder can avoid: Hugging Face's `ByteFallback` decoder turns a whole run of
/// `<0xNN>` tokens into U+FFFD once the run is not valid UTF-8, so a run that first forms
/// complete characters (already emitted) and then continues with invalid bytes decodes, in
/// full, to replacement characters the stream had shown as text. The stream then shows each
/// later token as it decodes in isolation.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    /// Ids from the start of the decode window (`prefix_offset` of the method) onwards.
    ids: Vec<u32>,
    /// Within `ids`: the ids before it have all been emitted (`read_offset - prefix_offset`).
    read: usize,
    /// `decode(ids[..read])`, the text the window's emitted part stands for.
    prefix_text: String,
}

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool) -> Self {
        Detokenizer {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
            prefix_text: String::new(),
        }
    }

    /// Adds one generated id; returns the text it completes (often empty while a multi-byte
    /// character is split over tokens, or for a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.decode(&self.ids)?;
        if text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let emitted = match text.strip_prefix(self.prefix_text.as_str()) {
            // Nothing new yet (a skipped special token, an empty piece): keep the window.
            Some("") => return Ok(String::new()),
            Some(new) => new.to_owned(),
            // The ByteFallback case documented on the type: the window's earlier text
            // changed. It was already shown; show the new ids' own text.
            None => {
                let own = self.decode(&self.ids[self.read..])?;
                if own.ends_with(REPLACEMENT) {
                    return Ok(String::new());
                }
                own
            }
        };
        self.advance()?;
        Ok(emitted)
    }

    /// Releases what is still held at the end of generation: an incomplete or invalid byte
    /// sequence decodes to U+FFFD exactly as the full decode shows it.
    pub fn finish(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let text = self.decode(&self.ids)?;
        let emitted = match text.strip_prefix(self.prefix_text.as_str()) {
            Some(new) => new.to_owned(),
            None => self.decode(&self.ids[self.read..])?,
        };
        self.advance()?;
        Ok(emitted)
    }

    /// After emitting, the window restarts at the old read offset: that keeps one emitted
    /// token (or more) of left context, which the decoder's start-of-text rules apply to
    /// in both decodes alike.
    fn advance(&mut self) -> Result<()> {
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = self.decode(&self.ids)?;
        Ok(())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| Error::Runtime(anyhow!("decoding generated token ids {ids:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;

    /// A word-level tokenizer without a decoder: tokens are joined with spaces.
    fn plain() -> Arc<Tokenizer> {
        let vocab = [
            ("a".to_string(), 0u32),
            ("b".to_string(), 1),
            ("!".to_string(), 2),
        ]
        .into_iter()
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("a".into())
            .build()
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("word-level model: {e}"));
        Arc::new(Tokenizer::new(model))
    }

    #[test]
    fn emits_every_token_at_once_without_a_decoder() {
        let tok = plain();
        let mut d = Detokenizer::new(tok.clone(), false);
        let ids = [0u32, 1, 2, 0];
        let pieces: Vec<String> = ids.iter().map(|&i| d.push(i).unwrap()).collect();
        assert_eq!(pieces, vec!["a", " b", " !", " a"]);
        assert_eq!(d.finish().unwrap(), "");
        assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap());
    }

    #[test]
    fn the_decode_window_stays_short_over_a_long_stream() {
        let mut d = Detokenizer::new(plain(), false);
        for i in 0..1000u32 {
            assert!(!d.push(i % 3).unwrap().is_empty());
            assert!(d.ids.len() <= 2, "window of {} ids", d.ids.len());
        }
    }

    #[test]
    fn unknown_ids_are_dropped_like_the_full_decode() {
        let tok = plain();
        let mut d = Detokenizer::new(tok.clone(), false);
        let ids = [0u32, 99, 1];
        let mut out: String = ids.iter().map(|&i| d.push(i).unwrap()).collect();
        out += &d.finish().unwrap();
        assert_eq!(out, tok.decode(&ids, false).unwrap());
    }
}
