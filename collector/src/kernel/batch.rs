//! Every entry of a BPF hash map in a few `BPF_MAP_LOOKUP_BATCH` calls (Linux 5.6), where
//! aya's per-key `get` takes one syscall per entry and `keys()` one more. The scrape reads the
//! scheduling maps this way: at 1000 instances the per-key reads were some 6000 `bpf()` calls a
//! scrape, each of them on the syscall-tracing slow path that the console tracepoints put every
//! task on, this collector's own included, and the reconciliation's walks of the tracked,
//! scheduling and console-descriptor maps every 2 s some 3000 a second more. aya has no batch
//! operations.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData},
};

/// `BPF_MAP_LOOKUP_BATCH` (`enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call: a bucket never holds more, so the kernel's `ENOSPC` (a bucket
/// larger than the room given) cannot happen, and the buffers stay small.
const CHUNK: u32 = 256;

/// The `batch` member of `union bpf_attr`; the kernel takes a shorter attribute than its own
/// and reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every `(key, value)` of `map`: in batches, else (a kernel without them) key by key with
/// aya's iterator, skipping entries removed during the walk.
pub(crate) fn all<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    entries(map).unwrap_or_else(|_| map.iter().filter_map(Result::ok).collect())
}

/// Every `(key, value)` of `map`, read in batches. `Err` when the kernel has no batch lookup
/// (before 5.6: `EINVAL`) or refuses it.
fn entries<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> io::Result<Vec<(K, V)>> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut keys: Vec<MaybeUninit<K>> = (0..CHUNK).map(|_| MaybeUninit::uninit()).collect();
    let mut values: Vec<MaybeUninit<V>> = (0..CHUNK).map(|_| MaybeUninit::uninit()).collect();
    // The position in the map: a bucket index for hash maps, opaque here.
    let (mut in_batch, mut out_batch) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const in_batch) as u64
            },
            out_batch: (&raw mut out_batch) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values and at the two batch
        // positions, all alive and writable for the call; the size passed is the struct's.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        // ENOENT: the end of the map, with the last `count` entries filled.
        let done = rc < 0 && {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error);
            }
            true
        };
        let filled = (attr.count as usize).min(CHUNK as usize);
        for i in 0..filled {
            // SAFETY: the kernel wrote `filled` whole keys and values; `Pod` types are valid
            // for any bytes.
            out.push(unsafe { (keys[i].assume_init_read(), values[i].assume_init_read()) });
        }
        if done {
            return Ok(out);
        }
        in_batch = out_batch;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use collector_common::{SchedKey, SchedStats};

    use super::*;

    #[test]
    fn every_entry_of_a_hash_map_across_batches() {
        // A standalone map needs CAP_BPF: like every test that needs BPF, this one fails
        // without it rather than skip.
        let mut map: HashMap<MapData, SchedKey, SchedStats> = HashMap::create(4096, 0)
            .unwrap_or_else(|error| panic!("a BPF hash map (run as root): {error}"));
        assert!(entries(&map).unwrap().is_empty(), "an empty map");
        // More than several chunks, with keys in many buckets.
        let inserted: Vec<(SchedKey, SchedStats)> = (0..1000u32)
            .map(|i| {
                let key = SchedKey {
                    tgid: 100_000 + i * 7,
                    class: i % 2,
                };
                let stats = SchedStats {
                    cpu_ns: u64::from(i) * 1000 + 1,
                    ..SchedStats::default()
                };
                (key, stats)
            })
            .collect();
        for (key, stats) in &inserted {
            map.insert(key, stats, 0).unwrap();
        }
        let mut read = entries(&map).unwrap();
        read.sort_by_key(|(key, _)| *key);
        let mut expected = inserted;
        expected.sort_by_key(|(key, _)| *key);
        assert_eq!(read.len(), expected.len());
        assert!(
            read.iter().zip(&expected).all(|(a, b)| a == b),
            "every key with its value, once"
        );
    }
}
