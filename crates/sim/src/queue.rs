//! The event queue: a 4-ary min-heap keyed by (time, sequence). Times are non-negative, so their
//! IEEE bits order like the numbers and compare as integers; four children per node halve the
//! depth of a binary heap, which is what a pop costs with 10^5 pending arrivals.

/// A queued item with its time.
pub trait Timed {
    /// (time bits, insertion sequence): earliest first, ties in insertion order.
    fn key(&self) -> (u64, u64);
}

#[derive(Debug)]
pub struct EventQueue<T> {
    items: Vec<T>,
}

impl<T: Timed> EventQueue<T> {
    pub fn new() -> EventQueue<T> {
        EventQueue { items: Vec::new() }
    }

    pub fn push(&mut self, item: T) {
        self.items.push(item);
        let mut i = self.items.len() - 1;
        while i > 0 {
            let parent = (i - 1) / 4;
            if self.items[i].key() < self.items[parent].key() {
                self.items.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    pub fn pop(&mut self) -> Option<T> {
        let last = self.items.len().checked_sub(1)?;
        self.items.swap(0, last);
        let top = self.items.pop();
        let n = self.items.len();
        let mut i = 0;
        loop {
            let first = 4 * i + 1;
            if first >= n {
                break;
            }
            let mut best = first;
            for c in first + 1..(first + 4).min(n) {
                if self.items[c].key() < self.items[best].key() {
                    best = c;
                }
            }
            if self.items[best].key() < self.items[i].key() {
                self.items.swap(i, best);
                i = best;
            } else {
                break;
            }
        }
        top
    }
}

impl<T: Timed> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue::new()
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    use super::*;

    impl Timed for (f64, u64) {
        fn key(&self) -> (u64, u64) {
            (self.0.to_bits(), self.1)
        }
    }

    #[test]
    fn pops_in_time_then_insertion_order() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut q = EventQueue::new();
        let mut want = Vec::new();
        for seq in 0..10_000u64 {
            let t = f64::from(rng.gen_range(0..500u32)) / 7.0;
            q.push((t, seq));
            want.push((t, seq));
        }
        want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let got: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(got, want);
        assert!(q.pop().is_none());
    }
}
