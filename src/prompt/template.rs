//! Chat templates with Hugging Face semantics, rendered by minijinja.
//!
//! Hugging Face renders with jinja2 (`trim_blocks`, `lstrip_blocks`), Python string methods on
//! values, `raise_exception`, `strftime_now`, a Python-style `tojson`, and the `{% generation %}`
//! tag (a marker for training masks that renders its body unchanged).

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::media::Modality;

/// One part of a message's content, serialised as the dicts Hugging Face processors take.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    Text {
        text: String,
    },
    Image {},
    Video {},
    /// Also carries an (empty) `audio` key, as the dicts HF processors take do: some templates
    /// (Qwen2-Audio-7B-Instruct's) recognise an audio part by `'audio' in content` alone.
    Audio {
        audio: String,
    },
}

impl ContentPart {
    pub fn media(modality: Modality) -> Self {
        match modality {
            Modality::Image => ContentPart::Image {},
            Modality::Video => ContentPart::Video {},
            Modality::Audio => ContentPart::Audio {
                audio: String::new(),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: Vec<ContentPart>,
}

/// A message whose content is one string, for templates that take string content
/// (Llama 3's `message['content'] | trim`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TextMessage {
    pub role: String,
    pub content: String,
}

/// Where a template came from, for error messages.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    origin: String,
    special_tokens: Vec<(String, String)>,
}

/// The files a model directory may ship its template in, already read.
#[derive(Debug, Default, Clone)]
pub struct TemplateFiles {
    /// `--chat-template FILE`: (path, contents).
    pub override_file: Option<(String, String)>,
    /// `chat_template.jinja`.
    pub jinja: Option<String>,
    /// `chat_template.json`: `{"chat_template": "..."}`.
    pub json: Option<String>,
    /// `tokenizer_config.json`, parsed.
    pub tokenizer_config: Option<serde_json::Value>,
}

impl ChatTemplate {
    /// Picks the template as Hugging Face does: `--chat-template`, then `chat_template.jinja`,
    /// `chat_template.json`, `tokenizer_config.json`'s `chat_template`, then the family's
    /// fallback. `None` when there is none at all.
    pub fn select(files: &TemplateFiles, fallback: Option<&str>) -> Result<Option<Self>> {
        let special_tokens = files
            .tokenizer_config
            .as_ref()
            .map(special_tokens_of)
            .unwrap_or_default();
        let make = |source: String, origin: &str| {
            Some(ChatTemplate {
                source: strip_generation_tags(&source),
                origin: origin.to_string(),
                special_tokens: special_tokens.clone(),
            })
        };
        if let Some((path, text)) = &files.override_file {
            return Ok(make(text.clone(), path));
        }
        if let Some(text) = &files.jinja {
            return Ok(make(text.clone(), "chat_template.jinja"));
        }
        if let Some(text) = &files.json {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                Error::input(
                    "chat_template.json",
                    format!("not valid JSON: {e}"),
                    "an object with a \"chat_template\" string",
                )
            })?;
            return match value.get("chat_template").and_then(|t| t.as_str()) {
                Some(t) => Ok(make(t.to_string(), "chat_template.json")),
                None => Err(Error::input(
                    "chat_template.json",
                    "no \"chat_template\" string",
                    "an object with a \"chat_template\" string",
                )),
            };
        }
        if let Some(template) = files
            .tokenizer_config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
        {
            if let Some(text) = template_from_tokenizer_config(template) {
                return Ok(make(text, "tokenizer_config.json"));
            }
        }
        Ok(fallback.and_then(|f| make(f.to_string(), "built-in fallback template")))
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The special token named `name` in tokenizer_config.json (e.g. `bos_token`).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Renders `messages` with `add_generation_prompt`, as `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_any(messages, add_generation_prompt)
    }

    /// As [`ChatTemplate::render`], for templates that take string content.
    pub fn render_text(
        &self,
        messages: &[TextMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_any(messages, add_generation_prompt)
    }

    fn render_any<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = environment();
        let template = env.template_from_str(&self.source).map_err(|e| {
            Error::input(
                &self.origin,
                format!("chat template does not parse: {e}"),
                "a Jinja chat template",
            )
        })?;
        let mut ctx: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        ctx.push(("messages".into(), Value::from(Serde(messages))));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: std::collections::BTreeMap<String, Value> = ctx.into_iter().collect();
        template.render(ctx).map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                _ => e.to_string(),
            };
            Error::input(
                &self.origin,
                format!("chat template failed to render: {detail}"),
                "a template that accepts these messages",
            )
        })
    }
}

/// `bos_token`, `eos_token`, … from tokenizer_config.json (strings or AddedToken dicts).
/// The text of a special token as tokenizer_config.json writes it: a string, or an
/// AddedToken object `{"content": …}`.
pub fn token_text(v: &serde_json::Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
}

fn special_tokens_of(config: &serde_json::Value) -> Vec<(String, String)> {
    let Some(obj) = config.as_object() else {
        return Vec::new();
    };
    obj.iter()
        .filter(|(k, _)| k.ends_with("_token"))
        .filter_map(|(k, v)| Some((k.clone(), token_text(v)?.to_string())))
        .collect()
}

/// tokenizer_config.json's `chat_template` is a string, or a list of `{name, template}` of
/// which `default` is used.
fn template_from_tokenizer_config(value: &serde_json::Value) -> Option<String> {
    if let Some(s) = value.as_str() {
        return Some(s.to_string());
    }
    value.as_array()?.iter().find_map(|entry| {
        (entry.get("name")?.as_str()? == "default")
            .then(|| entry.get("template")?.as_str().map(str::to_string))
            .flatten()
    })
}

/// Removes `{% generation %}` / `{% endgeneration %}` (with any whitespace control), which
/// Hugging Face's jinja extension renders as their body.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = tag
            .trim_start_matches("{%")
            .trim_end_matches("%}")
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Instructions a template may run per render: thousands for a real chat template, while a
/// template that loops without end stops with an error instead of hanging.
const TEMPLATE_FUEL: u64 = 20_000_000;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    // jinja2 as Hugging Face configures it: trim_blocks and lstrip_blocks on.
    if let Ok(syntax) = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// Python's `json.dumps(value, ensure_ascii=False)` (separators `", "` and `": "`), or with
/// `indent` as jinja's `tojson(indent=N)`.
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, JinjaError> {
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(format)`: the current UTC date for the common codes templates use.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(parts: Vec<ContentPart>) -> Message {
        Message {
            role: "user".into(),
            content: parts,
        }
    }

    #[test]
    fn string_content_messages_render_as_strings() {
        let files = TemplateFiles {
            jinja: Some(
                "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}{% endfor %}"
                    .into(),
            ),
            ..Default::default()
        };
        let t = ChatTemplate::select(&files, None).unwrap().unwrap();
        let msgs = [TextMessage {
            role: "user".into(),
            content: " <|audio|>\nhi \n".into(),
        }];
        assert_eq!(t.render_text(&msgs, true).unwrap(), "[user]<|audio|>\nhi");
    }

    #[test]
    fn generation_tags_are_removed_and_other_tags_kept() {
        let src = "{% for m in x %}{%- generation -%}{{ m }}{% endgeneration %}{% endfor %}";
        assert_eq!(
            strip_generation_tags(src),
            "{% for m in x %}{{ m }}{% endfor %}"
        );
    }

    #[test]
    fn renders_hf_style_template_with_python_methods() {
        let files = TemplateFiles {
            jinja: Some(
                "{% for message in messages %}{{ message['role'].upper() + ': ' }}\
                 {% for c in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}\
                 {% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'].strip() }}{% endfor %}\
                 {% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
                    .into(),
            ),
            ..Default::default()
        };
        let t = ChatTemplate::select(&files, None).unwrap().unwrap();
        let msgs = [user(vec![
            ContentPart::Image {},
            ContentPart::Text {
                text: "  hi  ".into(),
            },
        ])];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "USER: <image>\nhi ASSISTANT:"
        );
    }

    #[test]
    fn raise_exception_becomes_an_input_error() {
        let files = TemplateFiles {
            jinja: Some("{{ raise_exception('only user turns') }}".into()),
            ..Default::default()
        };
        let t = ChatTemplate::select(&files, None).unwrap().unwrap();
        let err = t.render(&[], true).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("only user turns"), "{err}");
    }

    #[test]
    fn selection_order_follows_hugging_face() {
        let tok: serde_json::Value = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "chat_template": [{"name": "default", "template": "from tokenizer_config"}]
        });
        let mut files = TemplateFiles {
            tokenizer_config: Some(tok),
            ..Default::default()
        };
        let pick = |f: &TemplateFiles| {
            let t = ChatTemplate::select(f, Some("fallback")).unwrap().unwrap();
            t.render(&[], false).unwrap()
        };
        assert_eq!(pick(&files), "from tokenizer_config");
        files.json = Some(r#"{"chat_template": "from json"}"#.into());
        assert_eq!(pick(&files), "from json");
        files.jinja = Some("from jinja {{ bos_token }}".into());
        assert_eq!(pick(&files), "from jinja <s>");
        files.override_file = Some(("mine.jinja".into(), "override".into()));
        assert_eq!(pick(&files), "override");
        assert_eq!(
            pick(&TemplateFiles::default()),
            "fallback",
            "fallback only without any file"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let files = TemplateFiles {
            jinja: Some("{{ {'a': [1, 'é'], 'b': none} | tojson }}".into()),
            ..Default::default()
        };
        let t = ChatTemplate::select(&files, None).unwrap().unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            r#"{"a": [1, "é"], "b": null}"#
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
