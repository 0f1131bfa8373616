//! Guest output made safe for the operator's terminal: a guest writes what it likes to its
//! console, escape sequences included (retitle the window, rewrite the screen, answer-back
//! tricks), so `collector logs` shows every control character as text unless `--raw`.
//!
//! - C0 controls and DEL in caret notation (`^[` for ESC, `^M` for CR, `^?` for DEL), tab
//!   kept; NUL as `\x00`;
//! - C1 controls (U+0080 to U+009F: CSI, OSC, ...) and the bidirectional overrides, which
//!   reorder what is shown, as `\u{..}`;
//! - a backslash stays a backslash: the rendering is for eyes, not to be parsed back.

use std::fmt::Write;

/// `text` with every control character visible.
pub(super) fn render(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push('\t'),
            '\0' => out.push_str("\\x00"),
            '\u{1}'..='\u{1f}' => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            '\u{7f}' => out.push_str("^?"),
            '\u{80}'..='\u{9f}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_shown() {
        let cases = [
            ("plain text", "plain text"),
            ("a\tb", "a\tb"),
            ("\u{1b}]0;owned\u{7}", "^[]0;owned^G"),
            ("\u{1b}[2J\u{1b}[H", "^[[2J^[[H"),
            ("nul\0byte", "nul\\x00byte"),
            ("cr\rover", "cr^Mover"),
            ("del\u{7f}", "del^?"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("é ✓", "é ✓"),
        ];
        for (text, want) in cases {
            assert_eq!(render(text), want, "{text:?}");
        }
    }
}
