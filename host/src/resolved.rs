//! The pipeline a run actually executed, written back as a pipeline file: overrides applied,
//! every plugin parameter written out (defaults included), plugins pinned by sha256
//! (`plugin = "wanda@sha256:…"`), the calibration and evaluation texts pinned by sha256, and
//! the evaluation protocol as applied. A report carries it, and `espalier run --from
//! report.json` parses and runs it like any pipeline file, so the pins refuse any other plugin
//! build or text with both hashes shown.

use std::path::Path;

use toml::{Table, Value};

use crate::evaluate::{EvalText, Protocol};
use crate::pipeline::DensitySpec;
use crate::plan::Plan;
use crate::plugin::Origin;
use crate::plugin::bindings::ParamValue;

/// A plugin parameter as a TOML value.
pub fn param_toml(v: &ParamValue) -> Value {
    match v {
        ParamValue::Boolean(b) => Value::Boolean(*b),
        ParamValue::Integer(i) => Value::Integer(*i),
        ParamValue::Float(f) => Value::Float(*f),
        ParamValue::Text(s) => Value::String(s.clone()),
        ParamValue::Integers(v) => Value::Array(v.iter().map(|&i| Value::Integer(i)).collect()),
        ParamValue::Floats(v) => Value::Array(v.iter().map(|&f| Value::Float(f)).collect()),
    }
}

/// A plugin parameter as a JSON value (for reports).
pub fn param_json(v: &ParamValue) -> serde_json::Value {
    match v {
        ParamValue::Boolean(b) => serde_json::Value::from(*b),
        ParamValue::Integer(i) => serde_json::Value::from(*i),
        ParamValue::Float(f) => serde_json::Value::from(*f),
        ParamValue::Text(s) => serde_json::Value::from(s.clone()),
        ParamValue::Integers(v) => serde_json::Value::from(v.clone()),
        ParamValue::Floats(v) => serde_json::Value::from(v.clone()),
    }
}

/// How a stage's density reads in a pipeline file.
pub fn density_toml(d: &DensitySpec) -> Value {
    match d {
        DensitySpec::Fixed(x) => Value::Float(*x),
        DensitySpec::Budget(None) => Value::String("budget".into()),
        DensitySpec::Budget(Some(stage)) => Value::String(format!("budget:{stage}")),
    }
}

fn strings(list: &[String]) -> Value {
    Value::Array(list.iter().cloned().map(Value::String).collect())
}

fn path_str(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// Where the run exported to, as the `[export]` section needs it.
pub struct ExportTarget<'a> {
    /// The folder.
    pub dir: &'a Path,
    /// Whether masks were written.
    pub masks: bool,
    /// The storage of a packed export (`None`: dense).
    pub packed: Option<crate::sparse::Storage>,
}

/// Writes the pipeline `plan` ran as TOML. `evaluation` is the protocol the evaluation
/// applied (with the text's hash), `export` where the output went; `header` becomes leading
/// comment lines.
pub fn resolved_pipeline(
    plan: &Plan,
    evaluation: Option<(&EvalText, &Protocol)>,
    export: Option<ExportTarget<'_>>,
    header: &str,
) -> String {
    let p = &plan.pipeline;
    let mut root = Table::new();
    root.insert("name".into(), Value::String(p.name.clone()));
    root.insert("model".into(), Value::String(p.model.value.clone()));

    let mut sandbox = Table::new();
    sandbox.insert(
        "timeout_s".into(),
        Value::Float(p.sandbox.timeout.as_secs_f64()),
    );
    sandbox.insert(
        "memory_mb".into(),
        Value::Integer((p.sandbox.guest_memory >> 20) as i64),
    );
    sandbox.insert(
        "host_memory_mb".into(),
        Value::Integer((p.sandbox.host_memory >> 20) as i64),
    );
    root.insert("sandbox".into(), Value::Table(sandbox));

    if let Some(set) = &plan.calibration {
        let spec = p.calibration_spec();
        let mut c = Table::new();
        c.insert("text".into(), path_str(&spec.text));
        c.insert("sha256".into(), Value::String(set.text_sha256.clone()));
        c.insert("samples".into(), Value::Integer(spec.samples as i64));
        c.insert("seq_len".into(), Value::Integer(spec.seq_len as i64));
        if spec.sequential {
            c.insert("sequential".into(), Value::Boolean(true));
        }
        root.insert("calibration".into(), Value::Table(c));
    }

    let mut stages = Vec::with_capacity(plan.stages.len());
    for stage in &plan.stages {
        let spec = &stage.spec;
        let mut t = Table::new();
        t.insert("name".into(), Value::String(spec.name.clone()));
        let plugin = match &stage.plugin.origin {
            Origin::Builtin => stage.plugin.info.name.clone(),
            Origin::File(_) => spec.plugin.value.clone(),
        };
        // A pulled plugin is pinned by its manifest digest (which pins the component's).
        let pinned = match &stage.plugin.source {
            Some(source) => source.clone(),
            None => format!("{plugin}@sha256:{}", stage.plugin.compiled.sha256),
        };
        t.insert("plugin".into(), Value::String(pinned));
        if let Some(targets) = &spec.targets {
            t.insert("targets".into(), strings(&targets.value));
        }
        if !spec.protect.value.is_empty() {
            t.insert("protect".into(), strings(&spec.protect.value));
        }
        if let Some(n) = stage.heads_per_block {
            t.insert("heads".into(), Value::Integer(n as i64));
        } else if let Some(d) = &spec.density {
            t.insert("density".into(), density_toml(&d.value));
        }
        if let Some(s) = &spec.schedule {
            let s = &s.schedule;
            let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
            let mut sched = Table::new();
            sched.insert("kind".into(), Value::String(s.kind.as_str().into()));
            sched.insert("start".into(), int(s.start));
            sched.insert("end".into(), int(s.end));
            sched.insert("every".into(), int(s.every));
            sched.insert("initial".into(), Value::Float(s.initial));
            t.insert("schedule".into(), Value::Table(sched));
        }
        if let Some(u) = &spec.update {
            let u = &u.update;
            let mut update = Table::new();
            update.insert(
                "every".into(),
                Value::Integer(i64::try_from(u.every).unwrap_or(i64::MAX)),
            );
            update.insert("start".into(), Value::Float(u.start));
            update.insert("end".into(), Value::Float(u.end));
            update.insert("drop_fraction".into(), Value::Float(u.drop_fraction));
            update.insert("anneal".into(), Value::String(u.anneal.as_str().into()));
            t.insert("update".into(), Value::Table(update));
        }
        if let Some(r) = &spec.lottery {
            let r = &r.rounds;
            let mut lottery = Table::new();
            lottery.insert("rounds".into(), Value::Integer(i64::from(r.count)));
            let rewind = match r.rewind {
                crate::lottery::Rewind::Init => Value::String("init".into()),
                crate::lottery::Rewind::Step(k) => {
                    let mut step = Table::new();
                    step.insert(
                        "step".into(),
                        Value::Integer(i64::try_from(k).unwrap_or(i64::MAX)),
                    );
                    Value::Table(step)
                }
            };
            lottery.insert("rewind".into(), rewind);
            t.insert("lottery".into(), Value::Table(lottery));
        }
        for (name, value) in &stage.params {
            t.insert(name.clone(), param_toml(value));
        }
        stages.push(Value::Table(t));
    }
    root.insert("stage".into(), Value::Array(stages));

    if let Some(f) = &p.finetune {
        let spec = &f.spec;
        let mut t = Table::new();
        t.insert("text".into(), path_str(&spec.text));
        let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        t.insert("steps".into(), int(spec.steps));
        t.insert("batch".into(), int(spec.batch as u64));
        t.insert("seq_len".into(), int(spec.seq_len as u64));
        t.insert("accumulate".into(), int(spec.accumulate as u64));
        t.insert("lr".into(), Value::Float(spec.lr));
        t.insert("warmup".into(), int(spec.warmup));
        t.insert("decay".into(), Value::String(spec.decay.as_str().into()));
        t.insert(
            "betas".into(),
            Value::Array(vec![
                Value::Float(spec.adamw.beta1),
                Value::Float(spec.adamw.beta2),
            ]),
        );
        t.insert("eps".into(), Value::Float(spec.adamw.eps));
        t.insert("weight_decay".into(), Value::Float(spec.adamw.weight_decay));
        t.insert("clip".into(), Value::Float(spec.clip.unwrap_or(0.0)));
        t.insert("seed".into(), int(spec.seed));
        if let Some(dir) = &spec.checkpoint_dir {
            t.insert("checkpoint_dir".into(), path_str(dir));
            t.insert("checkpoint_every".into(), int(spec.checkpoint_every));
        }
        root.insert("finetune".into(), Value::Table(t));
    }

    if let Some((text, protocol)) = evaluation {
        let mut e = Table::new();
        if let EvalText::File(path) = text {
            e.insert("text".into(), path_str(path));
        }
        e.insert("sha256".into(), Value::String(protocol.text_sha256.clone()));
        // The storage the pruned model was evaluated in: a rerun evaluates it the same way.
        let storage = p
            .evaluate
            .as_ref()
            .map_or(crate::sparse::Storage::F32, |e| e.value.storage);
        e.insert("storage".into(), Value::String(storage.name().into()));
        e.insert("window".into(), Value::Integer(protocol.window as i64));
        e.insert("stride".into(), Value::Integer(protocol.stride as i64));
        e.insert(
            "max_tokens".into(),
            Value::Integer(protocol.max_tokens.unwrap_or(0) as i64),
        );
        e.insert(
            "latency".into(),
            match (protocol.prompt_tokens, protocol.new_tokens) {
                (Some(prompt), Some(new)) => {
                    let mut l = Table::new();
                    l.insert("prompt_tokens".into(), Value::Integer(prompt as i64));
                    l.insert("new_tokens".into(), Value::Integer(new as i64));
                    Value::Table(l)
                }
                _ => Value::Boolean(false),
            },
        );
        root.insert("evaluate".into(), Value::Table(e));
    }

    if let Some(x) = export {
        let mut t = Table::new();
        t.insert("dir".into(), path_str(x.dir));
        t.insert("masks".into(), Value::Boolean(x.masks));
        if let Some(storage) = x.packed {
            t.insert("format".into(), Value::String("packed".into()));
            t.insert("storage".into(), Value::String(storage.name().into()));
        }
        root.insert("export".into(), Value::Table(t));
    }

    let body = toml::to_string(&root).unwrap_or_else(|e| format!("# cannot write: {e}\n"));
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&body);
    out
}
