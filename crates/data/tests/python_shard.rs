//! A shard written to the llm.c specification by a few lines of Python (the
//! standard library only: struct and array, as llm.c's write_datafile does with
//! numpy) reads back as the same tokens. Guards against our writer and reader
//! agreeing with each other but not with the format.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;

use trainer_data::Shard;

const WRITER: &str = r#"
import array, struct, sys
path, version = sys.argv[1], int(sys.argv[2])
toks = [0, 1, 2, 50256, 65535, 12345] if version == 1 else [0, 65536, 100000, 4294967295]
header = [20240520, version, len(toks)] + [0] * 253
with open(path, "wb") as f:
    f.write(struct.pack("<256i", *header))
    body = array.array("H" if version == 1 else "I", toks)
    if sys.byteorder == "big":
        body.byteswap()
    f.write(body.tobytes())
"#;

#[test]
fn python_written_shards_read_back() {
    let dir = tempfile::tempdir().unwrap();
    for (version, expected) in [(1, vec![0u32, 1, 2, 50256, 65535, 12345]), (2, vec![0, 65536, 100000, u32::MAX])] {
        let path = dir.path().join(format!("v{version}.bin"));
        let status = Command::new("python3")
            .args(["-c", WRITER, path.to_str().unwrap(), &version.to_string()])
            .status()
            .expect("python3 must be installed to run this test (.ci/run installs it)");
        assert!(status.success());
        let shard = Shard::open(&path).unwrap();
        let mut got = vec![0; shard.len()];
        shard.read(0, &mut got);
        assert_eq!(got, expected);
    }
}
