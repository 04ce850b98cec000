//! The frame decoder over arbitrary bytes: the first byte chooses the limits (bit 0: checksums
//! negotiated; bits 1..3: the largest payload), the rest is the stream, read frame after frame
//! until the decoder stops. Any panic is a finding, and so is an allocation past twice the
//! input and 1 MiB (one that follows an announced length instead of the bytes that came).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wccl::link::tcp::wire::{Limits, PREFIX, read_frame};

mod bounded;

#[global_allocator]
static ALLOC: bounded::Counting = bounded::Counting;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, mut stream)) = data.split_first() else {
        return;
    };
    let max_payload = match (choice >> 1) & 3 {
        0 => 0,
        1 => 4096,
        2 => 1 << 30,
        _ => u64::MAX,
    };
    let limits = Limits {
        max_payload,
        checksums: choice & 1 != 0,
    };
    bounded::bounded(data.len(), || {
        // A frame takes at least a prefix: the loop ends even if every read returned a frame.
        for _ in 0..=stream.len() / PREFIX {
            if read_frame(&mut stream, &limits, &mut wccl::link::Frame::default()).is_err() {
                break;
            }
        }
    });
});
