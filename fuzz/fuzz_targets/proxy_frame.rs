//! Backend bytes through `wire::frame::{check, parse}`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pushbridge::fuzzing::proxy_frames(data));
