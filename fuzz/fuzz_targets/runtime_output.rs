#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| linkmesh_integration::fuzzing::runtime_output(data));
