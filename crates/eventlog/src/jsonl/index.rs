//! The in-memory index of one log file: where each record starts, and which sequences belong
//! to each aggregate. It covers acknowledged (fsynced) records only, so readers never see an
//! append before it is durable.
use std::{collections::HashMap, ops::Range};

/// Offsets are positions in the log's *virtual* byte space: its segment files one after the
/// other (see `LogShared::read_into`). A log whose oldest segments were dropped for retention
/// starts at a later sequence (`first`).
#[derive(Debug)]
pub(super) struct Index {
    /// The sequence of `offsets[0]` (1 unless older records were dropped).
    first: u64,
    /// `offsets[i]` is the byte offset of the record with sequence `first + i`.
    offsets: Vec<u64>,
    /// Byte length of the committed part of the file (the end of the last record).
    end: u64,
    /// Each aggregate's sequences, ascending; the last one is its version.
    subjects: HashMap<Box<str>, Vec<u64>>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            first: 1,
            offsets: Vec::new(),
            end: 0,
            subjects: HashMap::new(),
        }
    }
}

impl Index {
    pub fn last_sequence(&self) -> u64 {
        self.first + self.offsets.len() as u64 - 1
    }

    /// The first sequence the index holds (the one after the last if it holds none).
    pub fn first_sequence(&self) -> u64 {
        self.first
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// For an index that holds nothing yet: the records before `first` are gone (dropped for
    /// retention), the next one pushed has sequence `first`.
    pub fn start_at(&mut self, first: u64) {
        debug_assert!(self.offsets.is_empty());
        self.first = first.max(1);
    }

    /// Forgets the records before `sequence` (a segment dropped for retention). Returns the
    /// subjects that have no record left.
    pub fn drop_before(&mut self, sequence: u64) -> Vec<Box<str>> {
        let drop = usize::try_from(sequence.saturating_sub(self.first))
            .unwrap_or(usize::MAX)
            .min(self.offsets.len());
        self.offsets.drain(..drop);
        self.first += drop as u64;
        let first = self.first;
        let mut emptied = Vec::new();
        self.subjects.retain(|subject, list| {
            let gone = list.partition_point(|&s| s < first);
            list.drain(..gone);
            if list.is_empty() {
                emptied.push(subject.clone());
            }
            !list.is_empty()
        });
        emptied
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

    /// The bytes of records `first..=last` (both within `first_sequence()..=last_sequence()`;
    /// outside it the range is cut to what exists, possibly to nothing).
    pub fn byte_range(&self, first: u64, last: u64) -> Range<u64> {
        let at = |sequence: u64| {
            let index = usize::try_from(sequence.saturating_sub(self.first)).unwrap_or(usize::MAX);
            self.offsets.get(index).copied().unwrap_or(self.end)
        };
        let start = at(first.max(self.first));
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

    #[test]
    fn dropping_a_prefix_keeps_sequences_and_offsets() {
        let mut index = Index::default();
        for i in 0..10u64 {
            let subject = if i < 4 {
                "invocation.a"
            } else {
                "invocation.b"
            };
            index.push(subject, &[i * 10], i * 10 + 10);
        }
        let emptied = index.drop_before(6);
        assert_eq!(emptied, vec![Box::from("invocation.a")]);
        assert_eq!((index.first_sequence(), index.last_sequence()), (6, 10));
        assert_eq!(index.aggregate("invocation.b"), &[6, 7, 8, 9, 10]);
        assert_eq!(
            index.byte_range(1, 7),
            50..70,
            "before the first is cut off"
        );
        assert_eq!(index.pieces(1, 10, 1000), vec![50..100]);

        let mut later = Index::default();
        later.start_at(42);
        assert_eq!(later.last_sequence(), 41);
        later.push("invocation.c", &[500], 510);
        assert_eq!(later.aggregate("invocation.c"), &[42]);
        assert_eq!(later.byte_range(42, 42), 500..510);
    }
}
