//! Device bytes through the MQTT codec's `check` and `parse`, v3.1.1 and v5.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pushbridge::fuzzing::mqtt_packets(data));
