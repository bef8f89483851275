//! Regenerates the checked-in gRPC code from `src/proto` with a pure-Rust
//! protobuf compiler (protox, so no `protoc` is needed) and fails when the
//! committed file differs. Set `LINKMESH_UPDATE_PROTO=1` to rewrite it.

use std::path::Path;

#[test]
fn generated_code_matches_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("src/proto");
    let proto = proto_dir.join("linkmesh/v1/fleet.proto");
    let fds = protox::compile([&proto], [&proto_dir]).expect("compile fleet.proto");

    let out = tempfile::tempdir().expect("temp dir");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .server_mod_attribute("linkmesh.v1", "#[cfg(feature = \"server\")]")
        .emit_rerun_if_changed(false)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("generate code");

    let generated =
        std::fs::read_to_string(out.path().join("linkmesh.v1.rs")).expect("read generated");
    let committed_path = root.join("src/proto/gen/linkmesh.v1.rs");
    if std::env::var_os("LINKMESH_UPDATE_PROTO").is_some() {
        std::fs::write(&committed_path, &generated).expect("write generated code");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "src/proto/gen/linkmesh.v1.rs is stale: run `LINKMESH_UPDATE_PROTO=1 cargo test --test proto_bootstrap` and commit the result"
    );
}
