//! Source positions of every value in a JSON document, by JSON pointer.
//!
//! serde_json reports where a syntax error is, but a parsed `Value` forgets where each part
//! came from. This scanner walks text that serde_json has already accepted and records,
//! for each pointer (`/steps/0/pipeline/arguments/prompt`), the line and column of the
//! member's key and of its value, so semantic errors can say `file:line:column` too.

use std::collections::HashMap;

/// A 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where a value sits: its key (for object members) and the value itself.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    key: Option<Position>,
    value: Position,
}

/// Positions of all values in a document.
#[derive(Debug, Default)]
pub struct Positions {
    spans: HashMap<String, Span>,
}

impl Positions {
    /// Indexes `source`, which must be valid JSON (parse it with serde_json first).
    pub fn index(source: &str) -> Self {
        let mut scanner = Scanner {
            chars: source.chars().collect(),
            at: 0,
            line: 1,
            column: 1,
            spans: HashMap::new(),
        };
        scanner.skip_ws();
        scanner.value(String::new(), None);
        Positions {
            spans: scanner.spans,
        }
    }

    /// Position of the value at `pointer`, or of its nearest indexed ancestor.
    pub fn value(&self, pointer: &str) -> Position {
        self.lookup(pointer, |s| s.value)
    }

    /// Position of the key of the member at `pointer` (its value for array items).
    pub fn key(&self, pointer: &str) -> Position {
        self.lookup(pointer, |s| s.key.unwrap_or(s.value))
    }

    fn lookup(&self, pointer: &str, pick: impl Fn(&Span) -> Position) -> Position {
        let mut p = pointer;
        loop {
            if let Some(span) = self.spans.get(p) {
                return pick(span);
            }
            match p.rfind('/') {
                Some(cut) => p = &p[..cut],
                None => return Position { line: 1, column: 1 },
            }
        }
    }
}

/// Escapes one pointer segment (RFC 6901).
pub fn pointer_segment(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

struct Scanner {
    chars: Vec<char>,
    at: usize,
    line: usize,
    column: usize,
    spans: HashMap<String, Span>,
}

impl Scanner {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += 1;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn here(&self) -> Position {
        Position {
            line: self.line,
            column: self.column,
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\n' | '\r')) {
            self.bump();
        }
    }

    fn value(&mut self, pointer: String, key: Option<Position>) {
        self.spans.insert(
            pointer.clone(),
            Span {
                key,
                value: self.here(),
            },
        );
        match self.peek() {
            Some('{') => {
                self.bump();
                self.skip_ws();
                while let Some(c) = self.peek() {
                    if c == '}' {
                        self.bump();
                        break;
                    }
                    if c == ',' {
                        self.bump();
                        self.skip_ws();
                        continue;
                    }
                    let key_pos = self.here();
                    let name = self.string();
                    self.skip_ws();
                    if self.peek() == Some(':') {
                        self.bump();
                    }
                    self.skip_ws();
                    self.value(
                        format!("{pointer}/{}", pointer_segment(&name)),
                        Some(key_pos),
                    );
                    self.skip_ws();
                }
            }
            Some('[') => {
                self.bump();
                self.skip_ws();
                let mut index = 0;
                while let Some(c) = self.peek() {
                    if c == ']' {
                        self.bump();
                        break;
                    }
                    if c == ',' {
                        self.bump();
                        self.skip_ws();
                        continue;
                    }
                    self.value(format!("{pointer}/{index}"), None);
                    index += 1;
                    self.skip_ws();
                }
            }
            Some('"') => {
                self.string();
            }
            Some(_) => {
                while matches!(self.peek(), Some(c) if !matches!(c, ',' | '}' | ']' | ' ' | '\t' | '\n' | '\r'))
                {
                    self.bump();
                }
            }
            None => {}
        }
    }

    /// Reads a string literal and returns its decoded text.
    fn string(&mut self) -> String {
        let start = self.at;
        self.bump(); // opening quote
        while let Some(c) = self.bump() {
            match c {
                '\\' => {
                    self.bump();
                }
                '"' => break,
                _ => {}
            }
        }
        let literal: String = self.chars[start..self.at].iter().collect();
        serde_json::from_str(&literal).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_are_located_by_pointer() {
        let src = "{\n  \"id\": \"x\",\n  \"steps\": [\n    {\"name\": \"a/b\", \"n\": 12}\n  ]\n}";
        let p = Positions::index(src);
        assert_eq!(p.key("/id"), Position { line: 2, column: 3 });
        assert_eq!(p.value("/id"), Position { line: 2, column: 9 });
        assert_eq!(p.value("/steps/0"), Position { line: 4, column: 5 });
        assert_eq!(p.key("/steps/0/name~1x"), Position { line: 4, column: 5 });
        assert_eq!(
            p.value("/steps/0/n"),
            Position {
                line: 4,
                column: 26
            }
        );
    }

    #[test]
    fn escaped_keys_and_unicode_do_not_shift_positions() {
        let src = "{\"a\\\"b\": \"é\", \"c/d\": 1}";
        let p = Positions::index(src);
        assert_eq!(p.key("/a\"b"), Position { line: 1, column: 2 });
        assert_eq!(
            p.key("/c~1d"),
            Position {
                line: 1,
                column: 15
            }
        );
    }

    #[test]
    fn an_unknown_pointer_falls_back_to_its_nearest_ancestor() {
        let src = "{\"v\": {\"w\": 1}}";
        let p = Positions::index(src);
        assert_eq!(p.value("/v/w/deeper/still"), p.value("/v/w"));
    }
}
