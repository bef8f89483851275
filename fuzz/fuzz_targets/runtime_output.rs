#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| linkmesh_fleet::fuzzing::runtime_output(data));
