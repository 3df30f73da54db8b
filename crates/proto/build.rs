//! Generates the event types from `proto/` without a system `protoc`: `protox` compiles the
//! schema to a descriptor set, `prost-build` turns it into Rust, and `pbjson-build` adds serde
//! impls that follow the proto3 JSON rules (RFC 3339 timestamps, camelCase names, enum names).
use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "switchboard/v1/envelope.proto",
        "switchboard/v1/server.proto",
        "switchboard/v1/connection.proto",
        "switchboard/v1/policy.proto",
        "switchboard/v1/invocation.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    let descriptors = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("switchboard_descriptor.bin");
    fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&files, &[&proto_root])?;

    pbjson_build::Builder::new()
        .register_descriptors(&fs::read(&descriptor_path)?)?
        // Events written by a newer version must still be readable: an unknown event type
        // leaves `Envelope::event` empty (the audit shows it raw) instead of failing the read.
        .ignore_unknown_fields()
        .ignore_unknown_enum_variants()
        .build(&[".switchboard"])?;
    Ok(())
}
