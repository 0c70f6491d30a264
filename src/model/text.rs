//! Text that came from input and goes back out — in an error, a park reason, a header, an event,
//! a terminal: bounded in size and stripped of control characters, so hostile input cannot make a
//! reply too large for the broker's frame or write escape sequences into an operator's terminal.

/// The most bytes of input-derived text any reason, header or event field carries.
pub const MAX_REASON_BYTES: usize = 4096;

/// `text` cut to at most `max_chars` characters (on a character boundary), saying how much was
/// left out; control characters written as escapes.
pub fn shorten(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (kept, (at, c)) in text.char_indices().enumerate() {
        if kept == max_chars {
            out.push_str(&format!("…({} more bytes)", text.len() - at));
            return out;
        }
        push_visible(&mut out, c);
    }
    out
}

/// `text` bounded to [`MAX_REASON_BYTES`] bytes (on a character boundary) and free of control
/// characters: what a park reason, a header or an event field may carry.
pub fn bounded(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REASON_BYTES));
    for (at, c) in text.char_indices() {
        let before = out.len();
        push_visible(&mut out, c);
        if out.len() > MAX_REASON_BYTES - 32 {
            out.truncate(before);
            out.push_str(&format!("…({} more bytes)", text.len() - at));
            return out;
        }
    }
    out
}

/// `text` with control characters (escape sequences, bells, carriage returns) made visible: what
/// may be printed to a terminal. Newlines and tabs are kept.
pub fn for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\n' || c == '\t' {
            out.push(c);
        } else {
            push_visible(&mut out, c);
        }
    }
    out
}

/// What a caught panic said (its `&str` or `String` payload), bounded like a reason: for the park
/// reason or the log line that reports it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let said = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    bounded(said)
}

fn push_visible(out: &mut String, c: char) {
    if c.is_control() {
        out.extend(c.escape_default());
    } else {
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary_and_says_so() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abcdef", 3), "abc…(3 more bytes)");
        assert_eq!(shorten("ééé", 1), "é…(4 more bytes)");
        let huge = "x".repeat(300_000);
        let cut = bounded(&huge);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with("more bytes)"));
        let multibyte = "€".repeat(10_000);
        assert!(bounded(&multibyte).len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn control_characters_are_made_visible() {
        assert_eq!(
            for_terminal("a\u{1b}[31mred\u{7}\r\nnext"),
            "a\\u{1b}[31mred\\u{7}\\r\nnext"
        );
        assert_eq!(shorten("\u{1b}]0;title\u{7}", 40), "\\u{1b}]0;title\\u{7}");
        assert!(!bounded("\u{1b}[2J").contains('\u{1b}'));
    }
}
