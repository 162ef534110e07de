//! Chat templates that llama.cpp does not know, rendered with a real Jinja engine (minijinja).
//!
//! Model files carry their chat template as Jinja source (`tokenizer.chat_template`). llama.cpp's
//! `llama_chat_apply_template` only recognises built-in templates (by name or by tell-tale
//! substrings); the engine tries it first and falls back to [`render`] here. The template comes
//! from an untrusted file, so rendering is bounded: a fuel limit stops runaway loops, the
//! recursion depth is capped, and nothing outside the given context is reachable.

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, context};

use super::api::ChatMessage;

/// Rendering budget (minijinja "fuel" counts executed instructions). Real chat templates use a
/// few thousand per message; this stops a hostile `{% for %}` long before it costs anything.
const FUEL: u64 = 2_000_000;

/// Longest rendered prompt accepted from a template.
const MAX_OUTPUT: usize = 4 << 20;

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

/// Renders `template` for `messages`, ending with the assistant's turn opened.
///
/// # Errors
/// Syntax errors, `raise_exception` calls in the template, exhausted fuel, oversized output.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TemplateError> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(64);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    // Hugging Face templates call Python string methods (`.strip()`, `.startswith()`).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    // Llama 3 templates stamp the date; a fixed one keeps prompts reproducible.
    env.add_function("strftime_now", |_fmt: String| -> String {
        "01 Jan 2026".to_string()
    });
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| TemplateError(e.to_string()))?;
    let out = tmpl
        .render(context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => true,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| TemplateError(e.to_string()))?;
    if out.len() > MAX_OUTPUT {
        return Err(TemplateError(format!(
            "rendered prompt is over {MAX_OUTPUT} bytes"
        )));
    }
    Ok(out)
}

/// The ChatML layout, used when a model has no template at all.
pub fn chatml(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "  hi  ".into(),
            },
        ]
    }

    #[test]
    fn renders_a_custom_template_with_python_methods() {
        // Not one of llama.cpp's built-ins: a made-up layout using HF-style Python methods.
        let t = "{{ bos_token }}{% for m in messages %}[{{ m.role|upper }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}";
        let out = render(t, &msgs(), "<s>", "</s>").unwrap();
        assert_eq!(out, "<s>[SYSTEM] Be brief.\n[USER] hi\n[ASSISTANT] ");
    }

    #[test]
    fn raise_exception_and_runaway_loops_fail_cleanly() {
        let t = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}";
        assert!(
            render(t, &msgs(), "", "")
                .unwrap_err()
                .0
                .contains("no system role")
        );
        let forever =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        assert!(render(forever, &msgs(), "", "").is_err());
        assert!(render("{% for %}", &msgs(), "", "").is_err());
    }

    #[test]
    fn chatml_layout() {
        assert_eq!(
            chatml(&msgs()[1..]),
            "<|im_start|>user\n  hi  <|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
