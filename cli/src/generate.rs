//! `espalier generate`: chat with or complete from a model, dense or pruned, with the text
//! streamed to the terminal as it is produced. A pruned export (a folder with
//! `masks.safetensors`) runs on Espalier's sparse kernels, as in its evaluation.

use std::io::Write as _;

use anyhow::{Result, bail};
use clap::Args;
use espalier::cancel::CancelToken;
use espalier::generate::{GenerateSpec, Generator, Message, Sampling};
use espalier_engine::KvDtype;

/// Options of `espalier generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A model directory (an export of `espalier run` too), builtin:NAME, or
    /// fetch:smollm2-135m-instruct.
    pub model: String,
    /// The prompt (with --chat: the user's message).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (tokenizer_config.json), as a user message.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// At most this many new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Weight storage of the linears [default: for a pruned export, the storage its run
    /// evaluated it in (its report.json); else f32].
    #[arg(long, value_enum)]
    pub storage: Option<crate::StorageArg>,
    /// 0 = greedy (the default, deterministic); above 0, sample at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Sample among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Divide a positive logit (multiply a negative one) of every token already in the prompt
    /// or the reply by R before choosing (as transformers' repetition_penalty and llama.cpp's
    /// --repeat-penalty; 1 = off, 1.1 to 1.3 curbs the loops small models fall into).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Lower a token's logit by F for each time the reply already holds it (OpenAI's
    /// frequency_penalty, -2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Lower the logit of every token the reply already holds by P (OpenAI's presence_penalty,
    /// -2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Stop when the text contains this (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// What the KV cache stores: f16 (half the memory and the bytes each token reads), f32
    /// (exact), or auto (f16 for bf16/int8 models, f32 for f32 ones).
    #[arg(long, default_value = "auto", value_parser = KvDtype::parse_setting)]
    pub kv_cache: KvCacheSetting,
}

/// `--kv-cache`: a [`KvDtype`], or `None` for auto.
pub type KvCacheSetting = Option<KvDtype>;

/// Runs `espalier generate`.
pub fn run(args: GenerateArgs, models_dir: &std::path::Path) -> Result<()> {
    let model_ref =
        espalier::fetch::resolve(&args.model, models_dir, &mut |m| err!("espalier: {m}"))?;
    let mut generator = Generator::load_in(&model_ref, args.storage.map(Into::into))?;
    if let Some(dtype) = args.kv_cache {
        generator.session.set_kv_dtype(dtype);
    }
    let prompt_text = if args.chat {
        let Some(template) = &generator.template else {
            bail!(
                "{model_ref} has no chat template (chat_template in tokenizer_config.json); drop --chat to complete the prompt as plain text"
            );
        };
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        template.render(&messages, true)?
    } else {
        args.prompt.clone()
    };
    let prompt = generator.tokenizer.encode(&prompt_text)?;
    let spec = GenerateSpec {
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            repetition_penalty: args.repeat_penalty,
            frequency_penalty: args.frequency_penalty,
            presence_penalty: args.presence_penalty,
        },
        stop: args.stop,
        ..GenerateSpec::default()
    };
    err!(
        "espalier: {model_ref} ({} prompt tokens; {})",
        prompt.len(),
        generator.runs_on()
    );
    let mut stdout = std::io::stdout().lock();
    let mut closed = false;
    let result = generator.generate(
        &prompt,
        &spec,
        &mut |text| {
            // A closed pipe (`| head`) ends generation quietly.
            let ok = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .is_ok();
            closed |= !ok;
            ok
        },
        &CancelToken::new(),
    );
    if closed {
        return Ok(());
    }
    let g = result?;
    let _ = writeln!(stdout);
    let per_s = if g.ms_per_token > 0.0 {
        format!(" ({:.1} tokens/s)", 1e3 / g.ms_per_token)
    } else {
        String::new()
    };
    err!(
        "espalier: {} tokens, first after {:.0} ms, then {:.1} ms/token{per_s}; finished: {}",
        g.tokens.len(),
        g.first_token_ms,
        g.ms_per_token,
        match g.finish {
            espalier::generate::FinishReason::Stop => "stop (EOS or a stop string)",
            espalier::generate::FinishReason::Length => "--max-tokens reached",
            espalier::generate::FinishReason::ContextFull => "the model's context is full",
            espalier::generate::FinishReason::Deadline => "the deadline passed",
        }
    );
    Ok(())
}
