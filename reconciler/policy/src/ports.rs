//! Port ranges as prefix-aligned blocks, the shape an LPM trie key can hold.

/// The fewest `(first_port, prefix_len)` blocks that cover exactly `lo..=hi`, in
/// ascending order. A block covers the `2^(16 - prefix_len)` ports starting at
/// `first_port`, which is aligned to that size; `(0, 0)` is every port. Empty when
/// `lo > hi`.
pub fn range_to_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest aligned block starting at `lo` that does not pass `hi`.
        let mut bits = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        out.push((u16::try_from(lo).expect("lo <= hi <= u16::MAX"), 16 - bits as u8));
        lo += 1 << bits;
    }
    out
}

/// The last port of the block `(first, prefix_len)`.
pub fn block_last(first: u16, prefix_len: u8) -> u16 {
    let span = (1u32 << (16 - u32::from(prefix_len.min(16)))) - 1;
    u16::try_from(u32::from(first) | span).expect("fits in 16 bits")
}

/// Whether the block `(outer, outer_len)` contains the block `(inner, inner_len)`.
pub fn block_contains(outer: u16, outer_len: u8, inner: u16, inner_len: u8) -> bool {
    outer_len <= inner_len && inner >= outer && block_last(inner, inner_len) <= block_last(outer, outer_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ports covered by a list of blocks, in order.
    fn expand(blocks: &[(u16, u8)]) -> Vec<u32> {
        blocks.iter().flat_map(|&(p, len)| u32::from(p)..=u32::from(block_last(p, len))).collect()
    }

    /// Fewest blocks by brute force: dynamic programming over aligned blocks.
    fn brute_force_count(lo: u32, hi: u32) -> usize {
        let mut best = vec![usize::MAX; (hi - lo + 2) as usize];
        best[0] = 0;
        for start in lo..=hi {
            let here = best[(start - lo) as usize];
            for bits in 0..=16u32 {
                let size = 1u32 << bits;
                if start % size != 0 || start + size - 1 > hi {
                    continue;
                }
                let next = (start + size - lo) as usize;
                best[next] = best[next].min(here + 1);
            }
        }
        best[(hi - lo + 1) as usize]
    }

    #[test]
    fn small_ranges_are_exact_and_minimal() {
        for lo in 0u16..=70 {
            for hi in lo..=70 {
                let blocks = range_to_prefixes(lo, hi);
                assert_eq!(expand(&blocks), (u32::from(lo)..=u32::from(hi)).collect::<Vec<_>>(), "{lo}-{hi}");
                for &(p, len) in &blocks {
                    let size = 1u32 << (16 - len);
                    assert_eq!(u32::from(p) % size, 0, "{lo}-{hi}: block {p}/{len} is aligned");
                }
                assert_eq!(blocks.len(), brute_force_count(lo.into(), hi.into()), "{lo}-{hi}");
            }
        }
    }

    #[test]
    fn edges() {
        assert_eq!(range_to_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(range_to_prefixes(8080, 8080), vec![(8080, 16)]);
        assert_eq!(range_to_prefixes(65535, 65535), vec![(65535, 16)]);
        assert_eq!(range_to_prefixes(1, 65535).len(), 16);
        assert_eq!(range_to_prefixes(8000, 8003), vec![(8000, 14)]);
        assert_eq!(range_to_prefixes(5, 4), vec![]);
        assert_eq!(range_to_prefixes(32768, 65535), vec![(32768, 1)]);
        let high = range_to_prefixes(60000, 65535);
        assert_eq!(expand(&high), (60000..=65535).collect::<Vec<_>>());
    }

    #[test]
    fn containment() {
        assert!(block_contains(8000, 14, 8002, 16));
        assert!(!block_contains(8000, 14, 8004, 16));
        assert!(block_contains(0, 0, 8004, 16));
        assert!(!block_contains(8002, 16, 8000, 14));
        assert!(block_contains(80, 16, 80, 16));
    }
}
