//! From a request's text and media to spliced token ids: the chat template (or the raw
//! prompt), tokenization as Hugging Face processors tokenize, and placeholder expansion.
//! What a model directory says about prompting is read once, at load, into [`PromptAssets`].

use tokenizers::Tokenizer;

use super::template::{self, ChatTemplate, ContentPart, Message, TemplateFiles, TextMessage};
use super::{splice, Expansion, PromptStyle, Spliced};
use crate::error::{Error, Result};
use crate::media::Modality;

/// A model's prompting facts, read once at load.
#[derive(Debug)]
pub struct PromptAssets {
    style: PromptStyle,
    /// The model's template (or the family's fallback); `None` when it has none.
    template: Option<ChatTemplate>,
    /// `tokenizer_config.json`, whose special tokens a `--chat-template` override also sees.
    tokenizer_config: Option<serde_json::Value>,
    /// The tokenizer's `bos_token` text.
    bos: Option<String>,
    /// Token ids that end generation.
    eos: Vec<u32>,
}

/// The files that decide how a model is prompted, already read (each optional).
#[derive(Debug, Default)]
pub struct AssetFiles {
    pub templates: TemplateFiles,
    pub generation_config: Option<serde_json::Value>,
}

/// One prompt to build.
#[derive(Debug, Clone, Copy)]
pub struct PromptInput<'a> {
    /// The model as the user named it, for errors.
    pub model: &'a str,
    pub text: &'a str,
    pub system: Option<&'a str>,
    /// Send `text` verbatim (it writes the placeholders itself).
    pub raw: bool,
    /// `--chat-template FILE`: (path, contents).
    pub chat_template: Option<&'a (String, String)>,
    /// A whole conversation (the server's `messages`) instead of `system` + `text`.
    pub turns: Option<&'a [Turn]>,
}

/// One message of a conversation: its role and its parts in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub parts: Vec<TurnPart>,
}

/// A part of a [`Turn`]: text, or the place of the prompt's next media item (items are taken
/// in order across the whole conversation).
#[derive(Debug, Clone, PartialEq)]
pub enum TurnPart {
    Text(String),
    Media,
}

/// One media item of the prompt: the name errors use, its modality and its expansion.
#[derive(Debug, Clone)]
pub struct PromptItem<'a> {
    pub input: &'a str,
    pub modality: Modality,
    pub expansion: &'a Expansion,
}

impl PromptAssets {
    /// Selects the chat template and reads BOS/EOS from `files` and `config.json`.
    pub fn new(
        files: AssetFiles,
        config: &serde_json::Value,
        style: PromptStyle,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let template = ChatTemplate::select(&files.templates, style.fallback_chat_template)?;
        let tokenizer_config = files.templates.tokenizer_config;
        let bos = tokenizer_config
            .as_ref()
            .and_then(|c| c.get("bos_token"))
            .and_then(template::token_text)
            .map(str::to_string);
        let eos = eos_ids(
            files.generation_config.as_ref(),
            config,
            tokenizer_config.as_ref(),
            tokenizer,
        );
        Ok(Self {
            style,
            template,
            tokenizer_config,
            bos,
            eos,
        })
    }

    /// Token ids that end generation.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// The prompt's token ids with each media placeholder expanded.
    pub fn build(
        &self,
        tokenizer: &Tokenizer,
        input: &PromptInput,
        items: &[PromptItem],
    ) -> Result<Spliced> {
        let text = self.render(input, items)?;
        self.tokenize_and_splice(tokenizer, input.raw, &text, items)
    }

    /// The prompt text: verbatim with `raw`, else the chat template applied to a user turn
    /// holding one content part per media item (in order) and the text.
    pub fn render(&self, input: &PromptInput, items: &[PromptItem]) -> Result<String> {
        if input.raw {
            return Ok(input.text.to_string());
        }
        let chosen;
        let template = match input.chat_template {
            Some(file) => {
                let files = TemplateFiles {
                    override_file: Some(file.clone()),
                    tokenizer_config: self.tokenizer_config.clone(),
                    ..Default::default()
                };
                chosen = ChatTemplate::select(&files, None)?;
                chosen.as_ref()
            }
            None => self.template.as_ref(),
        };
        let template = template.ok_or_else(|| {
            Error::input(
                input.model,
                "the model ships no chat template",
                "a chat template: pass --chat-template FILE, or --raw with the model's placeholders",
            )
        })?;
        if let Some(turns) = input.turns {
            return self.render_turns(template, turns, items);
        }
        if self.style.string_content {
            return self.render_string_content(template, input, items);
        }
        let mut messages = Vec::new();
        if let Some(system) = input.system {
            messages.push(Message {
                role: "system".into(),
                content: vec![ContentPart::Text {
                    text: system.to_string(),
                }],
            });
        }
        let mut content: Vec<ContentPart> = items
            .iter()
            .map(|item| ContentPart::media(item.modality))
            .collect();
        content.push(ContentPart::Text {
            text: input.text.to_string(),
        });
        messages.push(Message {
            role: "user".into(),
            content,
        });
        template.render(&messages, true)
    }

    /// The user turn for a template that takes string content: one placeholder per media
    /// item, each on its own line, then the text, as vLLM's `_get_full_multimodal_text_prompt`
    /// joins them (`"\n".join(placeholders + [text])`).
    /// Renders a conversation; media parts become the model's content parts (or, for
    /// templates that take string content, its placeholder on a line of its own, as a single
    /// prompt's media are).
    fn render_turns(
        &self,
        template: &ChatTemplate,
        turns: &[Turn],
        items: &[PromptItem],
    ) -> Result<String> {
        let media_parts = turns
            .iter()
            .flat_map(|t| &t.parts)
            .filter(|p| matches!(p, TurnPart::Media))
            .count();
        if media_parts != items.len() {
            return Err(Error::Runtime(anyhow::anyhow!(
                "{media_parts} media parts in the messages for {} media items",
                items.len()
            )));
        }
        let mut next = items.iter();
        if self.style.string_content {
            let mut messages = Vec::with_capacity(turns.len());
            for turn in turns {
                let mut lines = Vec::with_capacity(turn.parts.len());
                for part in &turn.parts {
                    match part {
                        TurnPart::Text(text) => lines.push(text.as_str()),
                        TurnPart::Media => {
                            let Some(item) = next.next() else { break };
                            let placeholder =
                                self.style.placeholders.get(&item.modality).ok_or_else(|| {
                                    Error::input(
                                        item.input,
                                        format!(
                                            "this model has no placeholder for {} items",
                                            item.modality
                                        ),
                                        "media of a modality the model accepts",
                                    )
                                })?;
                            lines.push(placeholder.as_str());
                        }
                    }
                }
                messages.push(TextMessage {
                    role: turn.role.clone(),
                    content: lines.join("\n"),
                });
            }
            return template.render_text(&messages, true);
        }
        let mut messages = Vec::with_capacity(turns.len());
        for turn in turns {
            let mut content = Vec::with_capacity(turn.parts.len());
            for part in &turn.parts {
                match part {
                    TurnPart::Text(text) => content.push(ContentPart::Text { text: text.clone() }),
                    TurnPart::Media => {
                        if let Some(item) = next.next() {
                            content.push(ContentPart::media(item.modality));
                        }
                    }
                }
            }
            messages.push(Message {
                role: turn.role.clone(),
                content,
            });
        }
        template.render(&messages, true)
    }

    fn render_string_content(
        &self,
        template: &ChatTemplate,
        input: &PromptInput,
        items: &[PromptItem],
    ) -> Result<String> {
        let mut messages = Vec::new();
        if let Some(system) = input.system {
            messages.push(TextMessage {
                role: "system".into(),
                content: system.to_string(),
            });
        }
        let mut lines = Vec::with_capacity(items.len() + 1);
        let mut numbered = 0;
        for item in items {
            if let Some(tags) = self
                .style
                .numbered_tags
                .filter(|t| t.modality == item.modality)
            {
                numbered += 1;
                lines.push(tags.tag(numbered));
                continue;
            }
            let placeholder = self.style.placeholders.get(&item.modality).ok_or_else(|| {
                Error::input(
                    item.input,
                    format!("this model has no placeholder for {} items", item.modality),
                    "media of a modality the model accepts",
                )
            })?;
            lines.push(placeholder.clone());
        }
        lines.push(input.text.to_string());
        messages.push(TextMessage {
            role: "user".into(),
            content: lines.join("\n"),
        });
        template.render_text(&messages, true)
    }

    /// Tokenizes the rendered prompt as Hugging Face processors do (special tokens added
    /// unless the text already starts with the BOS token) and expands each placeholder.
    fn tokenize_and_splice(
        &self,
        tokenizer: &Tokenizer,
        raw: bool,
        text: &str,
        items: &[PromptItem],
    ) -> Result<Spliced> {
        let starts_with_bos = self
            .bos
            .as_deref()
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let what = if raw {
            "--raw prompt"
        } else {
            "rendered prompt"
        };
        if let Some(tags) = &self.style.numbered_tags {
            let tagged: Vec<(usize, Expansion)> = items
                .iter()
                .enumerate()
                .filter(|(_, item)| item.modality == tags.modality)
                .map(|(i, item)| (i, item.expansion.clone()))
                .collect();
            if let Some(other) = items.iter().find(|item| item.modality != tags.modality) {
                return Err(Error::input(
                    other.input,
                    format!("this model has no tag for {} items", other.modality),
                    format!("{} items only", tags.modality),
                ));
            }
            return super::splice_numbered(text, tags, &tagged, what, |chunk| {
                Ok(tokenizer
                    .encode(chunk, true)
                    .map_err(|e| Error::Runtime(anyhow::anyhow!("tokenizing the prompt: {e}")))?
                    .get_ids()
                    .to_vec())
            });
        }
        let encoding = tokenizer
            .encode(text, raw || !starts_with_bos)
            .map_err(|e| Error::Runtime(anyhow::anyhow!("tokenizing the prompt: {e}")))?;
        let mut placeholders = Vec::new();
        for (m, p) in &self.style.placeholders {
            let id = tokenizer.token_to_id(p).ok_or_else(|| {
                Error::Runtime(anyhow::anyhow!(
                    "the tokenizer has no {p} token for {m} items"
                ))
            })?;
            placeholders.push((*m, id));
        }
        let expansions: Vec<(Modality, Expansion)> = items
            .iter()
            .map(|item| (item.modality, item.expansion.clone()))
            .collect();
        splice(encoding.get_ids(), &placeholders, &expansions, what)
    }
}

/// EOS ids: generation_config.json, else config.json (top level or text_config), else the
/// tokenizer's `eos_token`.
fn eos_ids(
    generation_config: Option<&serde_json::Value>,
    config: &serde_json::Value,
    tokenizer_config: Option<&serde_json::Value>,
    tokenizer: &Tokenizer,
) -> Vec<u32> {
    fn ids(v: Option<&serde_json::Value>) -> Option<Vec<u32>> {
        let v = v?;
        if let Some(n) = v.as_u64() {
            return Some(vec![n as u32]);
        }
        let list: Vec<u32> = v
            .as_array()?
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect();
        (!list.is_empty()).then_some(list)
    }
    ids(generation_config.and_then(|g| g.get("eos_token_id")))
        .or_else(|| ids(config.get("eos_token_id")))
        .or_else(|| {
            ids(config
                .get("text_config")
                .and_then(|t| t.get("eos_token_id")))
        })
        .unwrap_or_else(|| {
            tokenizer_config
                .and_then(|c| c.get("eos_token"))
                .and_then(template::token_text)
                .and_then(|t| tokenizer.token_to_id(t))
                .into_iter()
                .collect()
        })
}
