//! Where the configuration file's list items and their keys are, found in one pass over its YAML.
//!
//! serde_yaml says where a value is only when deserializing it fails, so the lines that
//! `--check-config` prints and the errors found after parsing (two routes on one listen address,
//! a route whose keys do not fit together) need another way to find an item that parsed fine.
//! This module owns that: one walk over the YAML events of `saphyr-parser`, recording for each
//! item of each top-level list where it starts and where the value of each of its keys starts.
//! One pass for the whole file keeps loading linear in its size (a locate per entry that parsed
//! the text again made a 4,000-entry allowlist take 45 s). Positions are 1-based line and column,
//! as serde_yaml reports its own errors, so every message reads the same whichever found it.

use std::collections::HashMap;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, Span, StrInput};

/// A 1-based (line, column).
pub type Position = (usize, usize);

/// One item of a top-level list.
#[derive(Debug, Default)]
struct Item {
    start: Position,
    /// Where the value of each key starts (the first time the key appears), when the item is a
    /// mapping.
    keys: HashMap<String, Position>,
}

/// The positions of every item of every top-level list of one YAML text. See the module docs.
#[derive(Debug, Default)]
pub struct Locations {
    lists: HashMap<String, Vec<Item>>,
}

impl Locations {
    /// Walks `text` once. Text the YAML parser cannot read yields what was found before the
    /// error (the caller has parsed the same text with serde_yaml already, so this is the rare
    /// corner where two parsers disagree: a line is then missing from a message, never wrong).
    pub fn find(text: &str) -> Locations {
        let mut walk = Walk {
            parser: Parser::new_from_str(text),
            text,
            line_starts: std::iter::once(0)
                .chain(text.match_indices('\n').map(|(at, _)| at + 1))
                .collect(),
        };
        let mut locations = Locations::default();
        walk.document(&mut locations);
        locations
    }

    /// Where `section[index]` starts, or where the value of its `key` starts: `None` if the file
    /// has no such item or key.
    pub fn get(&self, section: &str, index: usize, key: Option<&str>) -> Option<Position> {
        let item = self.lists.get(section)?.get(index)?;
        match key {
            None => Some(item.start),
            Some(key) => item.keys.get(key).copied(),
        }
    }

    /// The line of `section[index]`.
    pub fn line(&self, section: &str, index: usize) -> Option<usize> {
        self.get(section, index, None).map(|(line, _)| line)
    }
}

struct Walk<'a> {
    parser: Parser<'a, StrInput<'a>>,
    text: &'a str,
    /// The byte offset of each line's start.
    line_starts: Vec<usize>,
}

fn position(span: &Span) -> Position {
    (span.start.line(), span.start.col() + 1)
}

impl<'a> Walk<'a> {
    fn next(&mut self) -> Option<(Event<'a>, Span)> {
        self.parser.next_event()?.ok()
    }

    /// The first document's top-level mapping: each key's list, if its value is one.
    fn document(&mut self, locations: &mut Locations) -> Option<()> {
        loop {
            match self.next()?.0 {
                Event::StreamStart | Event::DocumentStart(_) => {}
                Event::MappingStart(..) => break,
                _ => return None,
            }
        }
        loop {
            let key = match self.next()? {
                (Event::MappingEnd, _) => return Some(()),
                (Event::Scalar(key, ..), _) => Some(key.into_owned()),
                (other, _) => {
                    self.skip(&other)?;
                    None
                }
            };
            let (value, _) = self.next()?;
            match (key, value) {
                (Some(key), Event::SequenceStart(..)) => {
                    let items = self.list()?;
                    locations.lists.entry(key).or_insert(items);
                }
                (_, other) => self.skip(&other)?,
            }
        }
    }

    /// The items of a list whose `SequenceStart` was just read.
    fn list(&mut self) -> Option<Vec<Item>> {
        let mut items = Vec::new();
        loop {
            let (event, span) = self.next()?;
            let mut item = Item {
                start: position(&span),
                keys: HashMap::new(),
            };
            match event {
                Event::SequenceEnd => return Some(items),
                Event::MappingStart(..) => self.keys(&mut item.keys)?,
                other => self.skip(&other)?,
            }
            items.push(item);
        }
    }

    /// The keys of a mapping whose `MappingStart` was just read, with where their values start.
    fn keys(&mut self, keys: &mut HashMap<String, Position>) -> Option<()> {
        loop {
            let (key, key_end) = match self.next()? {
                (Event::MappingEnd, _) => return Some(()),
                (Event::Scalar(key, ..), span) => (Some(key.into_owned()), span.end),
                (other, span) => {
                    self.skip(&other)?;
                    (None, span.end)
                }
            };
            let (value, span) = self.next()?;
            if let Some(key) = key {
                let at = match value {
                    // serde_yaml (libyaml) puts a block scalar where its `|` or `>` is;
                    // saphyr where its text starts, on a later line.
                    Event::Scalar(_, ScalarStyle::Literal | ScalarStyle::Folded, ..) => {
                        self.block_indicator_after(key_end)
                    }
                    _ => None,
                };
                keys.entry(key)
                    .or_insert_with(|| at.unwrap_or(position(&span)));
            }
            self.skip(&value)?;
        }
    }

    /// Where the first thing after the `:` that follows `key_end` is: a block scalar's
    /// indicator (after any spaces, line breaks and comments).
    fn block_indicator_after(&self, key_end: Marker) -> Option<Position> {
        let mut line = key_end.line();
        let line_start = *self.line_starts.get(line.checked_sub(1)?)?;
        let rest = self.text.get(line_start..)?;
        let mut col = 0;
        let mut chars = rest.chars().peekable();
        // Up to the key's end (a column counts characters).
        for _ in 0..key_end.col() {
            chars.next()?;
            col += 1;
        }
        let mut colon_seen = false;
        while let Some(c) = chars.next() {
            match c {
                ':' if !colon_seen => colon_seen = true,
                ' ' | '\t' | '\r' => {}
                '\n' => {
                    line += 1;
                    col = 0;
                    continue;
                }
                '#' if colon_seen => {
                    while chars.next_if(|c| *c != '\n').is_some() {}
                    continue;
                }
                _ if colon_seen => return Some((line, col + 1)),
                _ => return None,
            }
            col += 1;
        }
        None
    }

    /// Reads past the rest of the node that `first` started.
    fn skip(&mut self, first: &Event<'a>) -> Option<()> {
        let mut depth: usize = match first {
            Event::SequenceStart(..) | Event::MappingStart(..) => 1,
            _ => return Some(()),
        };
        while depth > 0 {
            match self.next()?.0 {
                Event::SequenceStart(..) | Event::MappingStart(..) => depth += 1,
                Event::SequenceEnd | Event::MappingEnd => depth -= 1,
                _ => {}
            }
        }
        Some(())
    }
}
