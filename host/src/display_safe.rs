//! Making text that a plugin (or any untrusted file) supplied safe to show on a terminal.
//!
//! A plugin's name, version, description, parameter docs, error strings and printed output
//! reach the user's terminal. Raw, they could clear the screen, set the window title, write the
//! clipboard (OSC 52), forge a status line with `\r`, reorder what is shown with bidi
//! overrides, or flood the terminal with a 100 MB message. Everything that displays such text
//! goes through this module: control characters (C0, DEL, C1), bidi controls and line
//! separators are escaped (`\u{1b}`, `\r`, ...), and the length is capped with a note of how
//! much was cut. The full text stays where it is kept (`report.json`, the error's own fields).

use std::fmt::Write as _;

/// Most characters shown of a name, version or other one-line label.
pub const NAME_MAX: usize = 200;
/// Most characters shown of a description, parameter doc or error message.
pub const MESSAGE_MAX: usize = 4096;
/// Most characters shown of one line a plugin printed.
pub const LOG_LINE_MAX: usize = 1024;
/// Most lines shown of what a plugin printed in one call.
pub const LOG_LINES_MAX: usize = 200;

/// Whether `c` must not reach a terminal raw.
fn is_unsafe(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c,
            '\u{061C}'                  // Arabic letter mark
            | '\u{200E}' | '\u{200F}'   // LRM, RLM
            | '\u{2028}' | '\u{2029}'   // line and paragraph separators
            | '\u{202A}'..='\u{202E}'   // bidi embeddings and overrides
            | '\u{2066}'..='\u{2069}'   // bidi isolates
            | '\u{FEFF}'                // zero-width no-break space
        )
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
}

/// The note appended when text is cut.
fn cut_note(out: &mut String, rest: &str) {
    let _ = write!(out, "… [{} more bytes not shown]", rest.len());
}

/// `s` on one line: every unsafe character escaped (newlines too), at most `max` characters
/// of the original shown.
pub fn line(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    for (shown, (i, c)) in s.char_indices().enumerate() {
        if shown == max {
            cut_note(&mut out, &s[i..]);
            break;
        }
        if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// A name, version or other label: one line, at most [`NAME_MAX`] characters.
pub fn name(s: &str) -> String {
    line(s, NAME_MAX)
}

/// Multi-line text (a description, an error message): the text's own line breaks are kept,
/// each following line starting with `indent`; every other unsafe character (`\r` included) is
/// escaped; at most `max` characters of the original are shown.
pub fn text(s: &str, max: usize, indent: &str) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    for (shown, (i, c)) in s.char_indices().enumerate() {
        if shown == max {
            cut_note(&mut out, &s[i..]);
            break;
        }
        if c == '\n' {
            out.push('\n');
            out.push_str(indent);
        } else if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// Text assembled from several sources (a whole error chain): every unsafe character but
/// `\n` escaped, line breaks kept as they are, at most `max` characters shown.
pub fn terminal(s: &str, max: usize) -> String {
    text(s, max, "")
}

/// A message (error, description, doc): multi-line kept with `indent`, at most
/// [`MESSAGE_MAX`] characters.
pub fn message(s: &str, indent: &str) -> String {
    text(s, MESSAGE_MAX, indent)
}

/// The lines a plugin printed, each escaped and capped at [`LOG_LINE_MAX`] characters, at
/// most [`LOG_LINES_MAX`] of them followed by a count of the rest.
pub fn log_lines(s: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut total = 0usize;
    for l in s.split('\n') {
        total += 1;
        if lines.len() < LOG_LINES_MAX {
            lines.push(line(l.strip_suffix('\r').unwrap_or(l), LOG_LINE_MAX));
        }
    }
    // `split` yields a final empty piece after a trailing newline: not a line of its own.
    if s.ends_with('\n') || s.is_empty() {
        total -= 1;
        if lines.len() > total {
            lines.pop();
        }
    }
    if total > lines.len() {
        lines.push(format!("… [{} more lines not shown]", total - lines.len()));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No byte a terminal interprets as a control survives.
    fn assert_inert(s: &str) {
        assert!(!s.chars().any(|c| is_unsafe(c) && c != '\n'), "{s:?}");
    }

    #[test]
    fn escapes_terminal_controls() {
        let hostile = "ok\u{1b}[2J\u{1b}]0;title\u{7}\u{1b}]52;c;SGVsbG8=\u{7}\rforged\u{9b}31m\u{202e}txt.exe\u{7f}";
        let shown = name(hostile);
        assert_inert(&shown);
        assert!(!shown.contains('\n'));
        assert!(
            shown.starts_with("ok\\u{1b}[2J\\u{1b}]0;title\\u{7}"),
            "{shown}"
        );
        assert!(
            shown.contains("\\rforged\\u{9b}31m\\u{202e}txt.exe\\u{7f}"),
            "{shown}"
        );
        // Plain text and non-ASCII letters pass unchanged.
        assert_eq!(name("magnitude – ü 漢字"), "magnitude – ü 漢字");
    }

    #[test]
    fn multi_line_text_keeps_its_breaks_indented_and_escapes_carriage_returns() {
        let shown = text("first\nsecond\r\u{1b}[1Athird", 100, "  ");
        assert_eq!(shown, "first\n  second\\r\\u{1b}[1Athird");
        assert_inert(&shown.replace('\n', ""));
        // A one-line label never keeps a break.
        assert_eq!(name("a\nb"), "a\\nb");
    }

    #[test]
    fn huge_text_is_capped_with_a_count() {
        let huge = "x".repeat(10_000_000);
        let shown = message(&huge, "");
        assert!(shown.len() < MESSAGE_MAX + 64, "{}", shown.len());
        assert!(
            shown.ends_with(&format!(
                "… [{} more bytes not shown]",
                10_000_000 - MESSAGE_MAX
            )),
            "{}",
            &shown[shown.len() - 60..]
        );
        // Cut on a character boundary of multi-byte text.
        let wide = "é".repeat(300);
        let shown = name(&wide);
        assert!(shown.starts_with(&"é".repeat(NAME_MAX)));
        assert!(shown.ends_with("[200 more bytes not shown]"), "{shown}");
        // Exactly at the limit: nothing cut.
        assert_eq!(name(&"y".repeat(NAME_MAX)), "y".repeat(NAME_MAX));
    }

    #[test]
    fn log_lines_are_escaped_capped_and_counted() {
        assert!(log_lines("").is_empty());
        assert_eq!(log_lines("a\r\nb\n"), vec!["a", "b"]);
        assert_eq!(log_lines("a\rforged"), vec!["a\\rforged"]);
        let many = "line\n".repeat(LOG_LINES_MAX + 5);
        let lines = log_lines(&many);
        assert_eq!(lines.len(), LOG_LINES_MAX + 1);
        assert_eq!(lines[LOG_LINES_MAX], "… [5 more lines not shown]");
        let long = log_lines(&"z".repeat(LOG_LINE_MAX * 3));
        assert_eq!(long.len(), 1);
        assert!(long[0].len() < LOG_LINE_MAX + 64);
    }
}
