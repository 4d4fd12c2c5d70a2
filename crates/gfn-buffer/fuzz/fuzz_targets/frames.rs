//! `cargo +nightly fuzz run frames` (from crates/gfn-buffer): arbitrary bytes as a server's
//! input stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gfn_buffer::fuzzing::feed(data);
});
