//! Generates the gRPC code from proto/usuite.proto with a vendored protoc, so building needs no
//! system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::compile_protos("proto/usuite.proto")?;
    println!("cargo:rerun-if-changed=proto/usuite.proto");
    Ok(())
}
