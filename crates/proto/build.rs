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
        "switchboard/v1/orchestrator.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }

    let descriptors = protox::compile(files, [&proto_root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("field_numbers.txt"),
        field_numbers(&descriptors).join("\n"),
    )?;
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

/// Every field and enum value of the `switchboard` packages as `Type.name = number`, sorted:
/// the schema's wire contract, checked against `proto/field_numbers.lock` by the tests so that
/// nothing is ever renumbered or reused.
fn field_numbers(descriptors: &prost_types::FileDescriptorSet) -> Vec<String> {
    fn message(prefix: &str, m: &prost_types::DescriptorProto, out: &mut Vec<String>) {
        let name = format!("{prefix}.{}", m.name());
        for field in &m.field {
            out.push(format!("{name}.{} = {}", field.name(), field.number()));
        }
        for nested in &m.nested_type {
            message(&name, nested, out);
        }
        for e in &m.enum_type {
            enumeration(&name, e, out);
        }
    }
    fn enumeration(prefix: &str, e: &prost_types::EnumDescriptorProto, out: &mut Vec<String>) {
        for value in &e.value {
            out.push(format!(
                "{prefix}.{}.{} = {}",
                e.name(),
                value.name(),
                value.number()
            ));
        }
    }
    let mut out = Vec::new();
    for file in descriptors
        .file
        .iter()
        .filter(|f| f.package().starts_with("switchboard"))
    {
        for m in &file.message_type {
            message(file.package(), m, &mut out);
        }
        for e in &file.enum_type {
            enumeration(file.package(), e, &mut out);
        }
    }
    out.sort();
    out
}
