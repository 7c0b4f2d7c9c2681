//! Prompts: chat templates (`template`), placeholder splicing, and `build`, which turns a
//! request into spliced token ids with what the model directory says (read once at load). The template renders the
//! model's own placeholder for each media item; after tokenizing, each placeholder token is
//! checked against the items and replaced by that item's [`Expansion`]. Imports only `media`
//! and `error`.

pub mod build;
pub mod template;

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::media::Modality;

/// How a family's prompts are written.
#[derive(Debug, Clone, Default)]
pub struct PromptStyle {
    /// The placeholder the chat template (or a `--raw` prompt) writes for each item of a
    /// modality.
    pub placeholders: BTreeMap<Modality, String>,
    /// Chat template used when the model directory ships none.
    pub fallback_chat_template: Option<&'static str>,
    /// Whether the chat template takes each message's content as one string (Llama 3's
    /// `message['content'] | trim`) rather than a list of typed parts: the user turn is then
    /// one placeholder line per media item followed by the text, as vLLM writes it.
    pub string_content: bool,
    /// The family builds its prompt itself (Whisper's task and language tokens): no chat
    /// template, so `--system`, `--chat-template` and `--raw` have nothing to act on.
    pub own_prompt: bool,
    /// Checks a prompt text of an `own_prompt` family without weights, so a bad one is refused
    /// (also by `--dry-run`) before anything loads.
    pub check_text: Option<fn(&str) -> Result<()>>,
}

/// How one media item appears in the token stream: `before`, then `slots` copies of
/// `slot_token` (whose embeddings are replaced by the item's features), then `after`.
/// Families whose media tokens are interleaved with text tokens (MiniCPM-V's slice markers and
/// newlines between its feature runs) give the ids of the whole run in `slot_ids` instead; the
/// item's features then cover every one of those positions, text tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub before: Vec<u32>,
    pub slot_token: u32,
    pub slots: usize,
    pub after: Vec<u32>,
    /// The ids at the `slots` positions when they are not all `slot_token` (then
    /// `slot_ids.len() == slots`); empty otherwise.
    pub slot_ids: Vec<u32>,
}

/// Where item `item`'s features go in the spliced ids: `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub item: usize,
    pub start: usize,
    pub len: usize,
}

/// Token ids with every placeholder expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    pub ids: Vec<u32>,
    pub spans: Vec<Span>,
}

/// Replaces, in order, each placeholder token of `ids` with the expansion of the next item of
/// that modality. `placeholders` maps a modality to its placeholder token id; `items` gives
/// each item's modality and expansion in prompt order. The count of placeholders of each
/// modality must equal the count of items: `what` names the prompt in the error.
pub fn splice(
    ids: &[u32],
    placeholders: &[(Modality, u32)],
    items: &[(Modality, Expansion)],
    what: &str,
) -> Result<Spliced> {
    let mut next: Vec<(Modality, std::collections::VecDeque<usize>)> = placeholders
        .iter()
        .map(|(m, _)| {
            let queue = items
                .iter()
                .enumerate()
                .filter(|(_, (im, _))| im == m)
                .map(|(i, _)| i)
                .collect();
            (*m, queue)
        })
        .collect();
    let mut out = Spliced {
        ids: Vec::with_capacity(ids.len()),
        spans: Vec::with_capacity(items.len()),
    };
    for &id in ids {
        let Some(modality) = placeholders.iter().find(|(_, t)| *t == id).map(|(m, _)| *m) else {
            out.ids.push(id);
            continue;
        };
        let queue = &mut next
            .iter_mut()
            .find(|(m, _)| *m == modality)
            .expect("queue per placeholder modality")
            .1;
        let Some(item) = queue.pop_front() else {
            return Err(count_error(ids, placeholders, items, modality, what));
        };
        let exp = &items[item].1;
        out.ids.extend_from_slice(&exp.before);
        out.spans.push(Span {
            item,
            start: out.ids.len(),
            len: exp.slots,
        });
        if exp.slot_ids.is_empty() {
            out.ids
                .extend(std::iter::repeat_n(exp.slot_token, exp.slots));
        } else if exp.slot_ids.len() == exp.slots {
            out.ids.extend_from_slice(&exp.slot_ids);
        } else {
            return Err(Error::Runtime(anyhow::anyhow!(
                "media item {} has {} slot ids for {} slots",
                item + 1,
                exp.slot_ids.len(),
                exp.slots
            )));
        }
        out.ids.extend_from_slice(&exp.after);
    }
    if let Some((modality, _)) = next.iter().find(|(_, q)| !q.is_empty()) {
        return Err(count_error(ids, placeholders, items, *modality, what));
    }
    if let Some((m, _)) = items
        .iter()
        .find(|(m, _)| !placeholders.iter().any(|(pm, _)| pm == m))
    {
        return Err(Error::input(
            what,
            format!("this model has no placeholder for {m} items"),
            "media of a modality the model accepts",
        ));
    }
    Ok(out)
}

fn count_error(
    ids: &[u32],
    placeholders: &[(Modality, u32)],
    items: &[(Modality, Expansion)],
    modality: Modality,
    what: &str,
) -> Error {
    let token = placeholders
        .iter()
        .find(|(m, _)| *m == modality)
        .map(|(_, t)| *t);
    let found = ids.iter().filter(|&&id| Some(id) == token).count();
    let wanted = items.iter().filter(|(m, _)| *m == modality).count();
    Error::input(
        what,
        format!("{found} {modality} placeholder(s) in the prompt but {wanted} {modality} item(s)"),
        "one placeholder per media item",
    )
}

/// Counts non-overlapping occurrences of `placeholder` in a `--raw` prompt.
pub fn count_placeholders(prompt: &str, placeholder: &str) -> usize {
    if placeholder.is_empty() {
        return 0;
    }
    prompt.matches(placeholder).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(slots: usize) -> Expansion {
        Expansion {
            before: vec![90],
            slot_token: 7,
            slots,
            after: vec![91],
            slot_ids: Vec::new(),
        }
    }

    #[test]
    fn expands_each_placeholder_in_order() {
        let ids = [1, 7, 5, 8, 7, 6];
        let items = [
            (Modality::Image, exp(2)),
            (Modality::Audio, exp(1)),
            (Modality::Image, exp(3)),
        ];
        let s = splice(
            &ids,
            &[(Modality::Image, 7), (Modality::Audio, 8)],
            &items,
            "prompt",
        )
        .unwrap();
        assert_eq!(
            s.ids,
            vec![1, 90, 7, 7, 91, 5, 90, 7, 91, 90, 7, 7, 7, 91, 6]
        );
        assert_eq!(
            s.spans,
            vec![
                Span {
                    item: 0,
                    start: 2,
                    len: 2
                },
                Span {
                    item: 1,
                    start: 7,
                    len: 1
                },
                Span {
                    item: 2,
                    start: 10,
                    len: 3
                },
            ]
        );
    }

    /// Slots interleaved with text tokens (MiniCPM-V's slices): the span covers them all and
    /// the ids are the given ones; a length that disagrees with `slots` is refused.
    #[test]
    fn slot_ids_stand_in_the_span() {
        let interleaved = Expansion {
            slot_ids: vec![7, 7, 50, 51, 7, 7],
            ..exp(6)
        };
        let s = splice(
            &[1, 7, 2],
            &[(Modality::Image, 7)],
            &[(Modality::Image, interleaved)],
            "p",
        )
        .unwrap();
        assert_eq!(s.ids, [1, 90, 7, 7, 50, 51, 7, 7, 91, 2]);
        assert_eq!(
            s.spans,
            [Span {
                item: 0,
                start: 2,
                len: 6
            }]
        );
        let short = Expansion {
            slot_ids: vec![7],
            ..exp(2)
        };
        assert!(splice(
            &[7],
            &[(Modality::Image, 7)],
            &[(Modality::Image, short)],
            "p"
        )
        .is_err());
    }

    #[test]
    fn too_many_or_too_few_placeholders_are_input_errors() {
        let items = [(Modality::Image, exp(2))];
        let ph = [(Modality::Image, 7)];
        let err = splice(&[7, 7], &ph, &items, "prompt").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("2 image placeholder(s)"), "{err}");
        let err = splice(&[1, 2], &ph, &items, "prompt").unwrap_err();
        assert!(err.to_string().contains("0 image placeholder(s)"), "{err}");
    }

    #[test]
    fn media_without_a_placeholder_modality_is_refused() {
        let items = [(Modality::Audio, exp(1))];
        let err = splice(&[1], &[(Modality::Image, 7)], &items, "prompt").unwrap_err();
        assert!(
            err.to_string().contains("no placeholder for audio"),
            "{err}"
        );
    }

    #[test]
    fn counts_raw_placeholders() {
        assert_eq!(
            count_placeholders("<image><image>\nhi <image>", "<image>"),
            3
        );
        assert_eq!(count_placeholders("no media", "<image>"), 0);
    }
}
