//! Distinct states of a batch. The trajectories of a batch share many states (all start at s0,
//! and on-policy rollouts branch from common prefixes: at 4x8 with batch 128 about half the
//! states are repeats, at 2x64 most are), and the networks are pure functions of the state, so
//! they run once per distinct state and their outputs are gathered per occurrence.

use rustc_hash::FxHashMap;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct UniqueRows {
    /// The distinct rows, in order of first occurrence, `dim` values each.
    pub rows: Vec<i64>,
    /// For each input row, the index of its distinct row.
    pub index_of: Vec<usize>,
    distinct: usize,
}

impl UniqueRows {
    pub fn new(states: &[i64], dim: usize) -> Self {
        let mut unique = UniqueRows::default();
        unique.fill(states, dim);
        unique
    }

    /// Replaces the contents with the distinct rows of `states` (rows of `dim` values), reusing
    /// the allocations.
    pub fn fill(&mut self, states: &[i64], dim: usize) {
        assert!(dim > 0, "states have at least one coordinate");
        self.rows.clear();
        self.index_of.clear();
        let mut first: FxHashMap<&[i64], usize> = FxHashMap::default();
        first.reserve(states.len() / dim);
        for row in states.chunks_exact(dim) {
            let next = first.len();
            let index = *first.entry(row).or_insert_with(|| next);
            if index == next {
                self.rows.extend_from_slice(row);
            }
            self.index_of.push(index);
        }
        self.distinct = first.len();
    }

    /// Number of distinct rows.
    pub fn len(&self) -> usize {
        self.distinct
    }

    pub fn is_empty(&self) -> bool {
        self.distinct == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_kept_once_in_order_of_first_occurrence() {
        let states = [0, 0, 1, 0, 0, 0, 1, 2, 1, 0];
        let unique = UniqueRows::new(&states, 2);
        assert_eq!(unique.rows, vec![0, 0, 1, 0, 1, 2]);
        assert_eq!(unique.index_of, vec![0, 1, 0, 2, 1]);
        assert_eq!(unique.len(), 3);
        for (i, &u) in unique.index_of.iter().enumerate() {
            assert_eq!(&states[2 * i..2 * i + 2], &unique.rows[2 * u..2 * u + 2]);
        }
    }

    #[test]
    fn refilling_forgets_the_previous_batch() {
        let mut unique = UniqueRows::new(&[5, 5, 5], 1);
        unique.fill(&[7, 8], 1);
        assert_eq!(
            (unique.rows.as_slice(), unique.index_of.as_slice()),
            (&[7, 8][..], &[0, 1][..])
        );
        unique.fill(&[], 1);
        assert!(unique.is_empty() && unique.rows.is_empty());
    }
}
