//! The in-memory index of one log file: where each record starts, and which sequences belong
//! to each aggregate. It covers acknowledged (fsynced) records only, so readers never see an
//! append before it is durable.
use std::{collections::HashMap, ops::Range};

#[derive(Debug, Default)]
pub(super) struct Index {
    /// `offsets[i]` is the byte offset of the record with sequence `i + 1`.
    offsets: Vec<u64>,
    /// Byte length of the committed part of the file (the end of the last record).
    end: u64,
    /// Each aggregate's sequences, ascending; the last one is its version.
    subjects: HashMap<Box<str>, Vec<u64>>,
}

impl Index {
    pub fn last_sequence(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// Adds the records of one append (or one recovered record): their start offsets, in
    /// sequence order, all of `subject`.
    pub fn push(&mut self, subject: &str, offsets: &[u64], end: u64) {
        let first = self.last_sequence() + 1;
        self.offsets.extend_from_slice(offsets);
        let sequences = first..first + offsets.len() as u64;
        match self.subjects.get_mut(subject) {
            Some(list) => list.extend(sequences),
            None => {
                self.subjects.insert(subject.into(), sequences.collect());
            }
        }
        self.end = end;
    }

    /// The sequences of an aggregate's events.
    pub fn aggregate(&self, subject: &str) -> &[u64] {
        self.subjects.get(subject).map_or(&[], Vec::as_slice)
    }

    /// Every aggregate's version (the sequence of its last event).
    pub fn versions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.subjects
            .iter()
            .filter_map(|(subject, list)| Some((&**subject, *list.last()?)))
    }

    /// The bytes of records `first..=last` (both within `1..=last_sequence()`; outside it the
    /// range is cut to what exists, possibly to nothing).
    pub fn byte_range(&self, first: u64, last: u64) -> Range<u64> {
        let at = |sequence: u64| {
            let index = usize::try_from(sequence.saturating_sub(1)).unwrap_or(usize::MAX);
            self.offsets.get(index).copied().unwrap_or(self.end)
        };
        let start = at(first.max(1));
        let end = at(last.saturating_add(1)).max(start);
        start..end
    }

    /// Splits the bytes of records `first..=last` at record boundaries into pieces of about
    /// `piece_bytes` (a record larger than that is a piece of its own).
    pub fn pieces(&self, first: u64, last: u64, piece_bytes: u64) -> Vec<Range<u64>> {
        let Range { start, end } = self.byte_range(first, last);
        let mut pieces = Vec::with_capacity(((end - start) / piece_bytes.max(1) + 1) as usize);
        let mut at = start;
        while at < end {
            let target = at.saturating_add(piece_bytes);
            let cut = if target >= end {
                end
            } else {
                // The first record starting at or after `target` begins the next piece.
                let next = self.offsets.partition_point(|&offset| offset < target);
                self.offsets.get(next).copied().unwrap_or(self.end).min(end)
            };
            pieces.push(at..cut);
            at = cut;
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_at_record_boundaries() {
        let mut index = Index::default();
        // Ten records of 10 bytes each.
        for i in 0..10u64 {
            index.push("server.a", &[i * 10], i * 10 + 10);
        }
        assert_eq!(index.byte_range(3, 5), 20..50);
        assert_eq!(
            index.pieces(1, 10, 25),
            vec![0..30, 30..60, 60..90, 90..100]
        );
        assert_eq!(index.pieces(10, 10, 25), vec![90..100]);
        assert_eq!(index.pieces(2, 3, 1), vec![10..20, 20..30]);
        assert_eq!(index.aggregate("server.a").len(), 10);
        assert_eq!(index.byte_range(11, 12), 100..100);
        assert_eq!(index.byte_range(0, 1), 0..10);
        assert!(index.aggregate("server.b").is_empty());
    }
}
