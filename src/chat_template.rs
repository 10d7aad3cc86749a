//! Chat prompts: the checkpoint's own chat template, rendered with minijinja
//! the way transformers' `apply_chat_template` renders it (trim_blocks and
//! lstrip_blocks on, Python string methods available), so a chat prompt gives
//! the same tokens as in transformers.

use std::path::Path;

use anyhow::{bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

pub struct ChatTemplate {
    source: String,
}

impl ChatTemplate {
    /// The template in `chat_template.jinja` (transformers 5) or in
    /// `tokenizer_config.json` (transformers 4).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?;
            return Ok(Self { source });
        }
        let config_path = dir.join("tokenizer_config.json");
        // Errors say what is wrong with the files; callers say what needed
        // the template (`generate --chat`, `chat`).
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let source = match config.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            // A list of named templates: use the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .context("tokenizer_config.json has no default chat template")?,
            _ => bail!("{} has no chat_template", config_path.display()),
        };
        Ok(Self { source })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    /// `enable_thinking: Some(false)` asks Qwen3 to answer without thinking.
    pub fn render(&self, messages: &[Message], enable_thinking: Option<bool>) -> Result<String> {
        let mut env = Environment::new();
        let mut syntax = SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build()?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        let template = env
            .template_from_str(&self.source)
            .context("the model's chat template does not parse")?;
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| context! { role => m.role.clone(), content => m.content.clone() })
            .collect();
        let rendered = match enable_thinking {
            Some(thinking) => template.render(context! {
                messages => messages,
                add_generation_prompt => true,
                enable_thinking => thinking,
            }),
            None => {
                template.render(context! { messages => messages, add_generation_prompt => true })
            }
        };
        rendered.map_err(|e| anyhow::anyhow!("cannot render the chat template: {e}"))
    }
}
