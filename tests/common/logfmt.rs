//! A small logfmt parser, to read finale's termination message back the way a log pipeline
//! would (no kubectl needed).

#![allow(dead_code)]

/// One line's `key=value` pairs, in order; a bare key has an empty value. Quoted values have
/// `\"`, `\\`, `\n`, `\r` and `\t` unescaped. Panics on a line that is not logfmt.
pub(crate) fn parse(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' {
                break;
            }
            assert!(c != '"', "a quote in a key: {line:?}");
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            assert!(chars.next().is_none(), "an empty key: {line:?}");
            return pairs;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next().expect("an unterminated quoted value") {
                        '"' => break,
                        '\\' => value.push(match chars.next().expect("a dangling escape") {
                            'n' => '\n',
                            'r' => '\r',
                            't' => '\t',
                            c @ ('"' | '\\') => c,
                            c => panic!("unknown escape \\{c} in {line:?}"),
                        }),
                        c => value.push(c),
                    }
                }
                assert!(
                    matches!(chars.peek(), None | Some(' ')),
                    "text right after a quoted value: {line:?}"
                );
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    assert!(c != '"' && c != '=', "unquoted {c:?} in a value: {line:?}");
                    value.push(c);
                    chars.next();
                }
            }
        }
        pairs.push((key, value));
    }
}

/// The value of `key` in parsed pairs.
pub(crate) fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
