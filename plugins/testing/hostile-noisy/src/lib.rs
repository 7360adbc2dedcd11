//! Test plugin: every text it hands the host carries terminal control sequences (clear screen,
//! window title, clipboard write, a `\r` that forges a status line, a bidi override) and some
//! are huge; the host must show them escaped and capped.
use espalier_plugin_sdk::*;

/// Clear screen, set the window title, write the clipboard, forge a line, reverse the text.
const NOISE: &str = "\u{1b}[2J\u{1b}]0;pwned-title\u{7}\u{1b}]52;c;cHduZWQ=\u{7}\r  ✓ forged-status\u{202e}gnp.exe\u{9b}31m";

struct P;
impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: format!("hostile-noisy{NOISE}"),
            version: format!("0.0.1{NOISE}"),
            description: format!(
                "A test plugin that misbehaves on purpose.{NOISE}\nsecond line{}",
                "d".repeat(1 << 20)
            ),
            params: vec![ParamSpec {
                name: format!("level{NOISE}"),
                kind: ParamKind::Text,
                default: Some(ParamValue::Text(format!(
                    "loud{NOISE}{}",
                    "t".repeat(100_000)
                ))),
                doc: format!("how loud{NOISE}{}", "p".repeat(1 << 20)),
            }],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }
    fn apply(_ctx: StageContext) -> Result<StageOutput, String> {
        println!("stdout says{NOISE}");
        eprintln!("stderr says{NOISE}");
        eprintln!("{}", "l".repeat(5000));
        for i in 0..300 {
            eprintln!("line {i}");
        }
        // 20 MB of error text, control sequences at both ends.
        Err(format!("{NOISE}{}{NOISE}", "e".repeat(20 << 20)))
    }
}
export_criterion!(P);
