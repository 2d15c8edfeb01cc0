//! Input channels: inputdataconfig.json says which channels the job has and
//! how they are delivered; /opt/ml/input/data/<channel>/ holds their files. In
//! File and FastFile mode a channel is a directory (S3 prefixes below the
//! channel's URI become subdirectories); its shards at any depth (llm.c `.bin`
//! token shards, or `.img` image shards, not both) become a glob pattern for
//! the data config. The `train` channel feeds
//! `data.train`; `validation` (or `val`) feeds `data.val`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::paths::Paths;
use crate::{Error, Result, io_err};

pub const TRAIN_CHANNEL: &str = "train";
/// Either name is accepted for the validation channel, not both.
pub const VALIDATION_CHANNELS: [&str; 2] = ["validation", "val"];

/// One channel's entry in inputdataconfig.json (other fields are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ChannelSpec {
    /// File, FastFile or Pipe.
    #[serde(rename = "TrainingInputMode", default)]
    pub input_mode: Option<String>,
    /// FullyReplicated or ShardedByS3Key.
    #[serde(rename = "S3DistributionType", default)]
    pub distribution: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputDataConfig {
    pub channels: BTreeMap<String, ChannelSpec>,
}

impl InputDataConfig {
    /// Reads the file; `Ok(None)` when the job has none (no input channels).
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let channels = serde_json::from_str(text).map_err(|e| Error::Settings {
            file: file.into(),
            msg: format!("expected a JSON object of channels: {e}"),
        })?;
        Ok(InputDataConfig { channels })
    }
}

/// A channel's shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelData {
    pub channel: String,
    pub dir: PathBuf,
    /// How many shard files the pattern matches.
    pub shards: usize,
    /// A glob pattern of every shard file (`.bin` or `.img`) under `dir`.
    pub pattern: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataChannels {
    pub train: Option<ChannelData>,
    pub val: Option<ChannelData>,
    pub notes: Vec<String>,
}

/// Finds the training and validation channels. A channel that is declared but
/// missing, empty, or in Pipe mode is an error naming the channel and its
/// directory; a channel neither declared nor present is `None`.
pub fn discover(paths: &Paths, config: Option<&InputDataConfig>) -> Result<DataChannels> {
    let mut out = DataChannels::default();
    out.train = channel(paths, config, TRAIN_CHANNEL, &mut out.notes)?;
    let mut vals = Vec::new();
    for name in VALIDATION_CHANNELS {
        if let Some(c) = channel(paths, config, name, &mut out.notes)? {
            vals.push(c);
        }
    }
    if vals.len() > 1 {
        let c = &vals[1];
        return Err(Error::Channel {
            channel: c.channel.clone(),
            dir: c.dir.display().to_string(),
            msg: format!("both `{}` and `{}` channels are given: use one for validation", vals[0].channel, c.channel),
        });
    }
    out.val = vals.pop();
    if let Some(t) = &out.train
        && let Some(example) = validation_named(&t.dir)?
    {
        return Err(Error::Channel {
            channel: t.channel.clone(),
            dir: t.dir.display().to_string(),
            msg: format!(
                "holds a validation shard ({example}), which would be trained on: put validation shards \
                 in a `validation` channel"
            ),
        });
    }
    Ok(out)
}

fn channel(
    paths: &Paths,
    config: Option<&InputDataConfig>,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<Option<ChannelData>> {
    let dir = paths.channel_dir(name);
    let spec = config.and_then(|c| c.channels.get(name));
    let err = |msg: String| Error::Channel { channel: name.into(), dir: dir.display().to_string(), msg };
    if spec.and_then(|s| s.input_mode.as_deref()).is_some_and(|m| m.eq_ignore_ascii_case("pipe")) {
        return Err(err("Pipe input mode is not supported: use File or FastFile".into()));
    }
    if !dir.is_dir() {
        if spec.is_some() {
            return Err(err("declared in inputdataconfig.json, but the directory does not exist".into()));
        }
        return Ok(None);
    }
    if spec.and_then(|s| s.distribution.as_deref()).is_some_and(|d| d.eq_ignore_ascii_case("ShardedByS3Key")) {
        notes.push(format!(
            "channel {name} is ShardedByS3Key: each host trains on its own subset of the shards \
             (FullyReplicated lets every rank draw from all of them)"
        ));
    }
    let mut shards = Vec::new();
    let mut others = Vec::new();
    walk(&dir, &mut shards, &mut others)?;
    let has = |ext: &str| shards.iter().find(|p| p.extension().is_some_and(|e| e == ext));
    let ext = match (has("bin"), has("img")) {
        (Some(bin), Some(img)) => {
            return Err(err(format!(
                "holds both token shards ({}) and image shards ({}): one data set per channel",
                rel(&dir, bin),
                rel(&dir, img)
            )));
        }
        (Some(_), None) => "bin",
        (None, Some(_)) => "img",
        (None, None) => {
            let seen = if others.is_empty() {
                "it is empty".to_string()
            } else {
                others.sort();
                let shown: Vec<String> = others.iter().take(3).map(|p| rel(&dir, p)).collect();
                format!("it holds {} other file(s): {}", others.len(), shown.join(", "))
            };
            return Err(err(format!(
                "no .bin token shards or .img image shards: {seen}. Upload the output of `trainer prepare` \
                 to the channel's S3 prefix"
            )));
        }
    };
    let pattern = format!("{}/**/*.{ext}", glob::Pattern::escape(&dir.display().to_string()));
    Ok(Some(ChannelData { channel: name.into(), dir, shards: shards.len(), pattern }))
}

/// Every file below `dir`: shards (`.bin`, `.img`) into `shards`, the rest
/// into `others`. Symbolic links to files count; links to directories are not followed.
fn walk(dir: &Path, shards: &mut Vec<PathBuf>, others: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_dir() {
            walk(&path, shards, others)?;
        } else if path.is_file() {
            if path.extension().is_some_and(|e| e == "bin" || e == "img") {
                shards.push(path)
            } else {
                others.push(path)
            }
        }
    }
    Ok(())
}

fn rel(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

/// A shard named the way `trainer prepare` and llm.c name validation shards
/// (`val_000000.bin`, `val_000000.img`, `fineweb_val_000000.bin`), if the directory holds one.
fn validation_named(dir: &Path) -> Result<Option<String>> {
    let (mut shards, mut others) = (Vec::new(), Vec::new());
    walk(dir, &mut shards, &mut others)?;
    shards.sort();
    Ok(shards.iter().find_map(|p| {
        let name = p.file_name()?.to_str()?;
        (name.starts_with("val_") || name.contains("_val_")).then(|| rel(dir, p))
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;

    fn tree() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path().join("ml"));
        fs::create_dir_all(p.data_dir()).unwrap();
        (d, p)
    }

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    fn matches(pattern: &str) -> Vec<String> {
        glob::glob(pattern).unwrap().map(|p| p.unwrap().file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn shards_at_any_depth_become_a_pattern() {
        let (_d, p) = tree();
        touch(&p.channel_dir("train").join("train_000001.bin"));
        touch(&p.channel_dir("train").join("part2/train_000002.bin"));
        touch(&p.channel_dir("train").join("README.txt"));
        touch(&p.channel_dir("val").join("val_000000.bin"));
        let c = discover(&p, None).unwrap();
        let t = c.train.unwrap();
        assert_eq!(t.shards, 2);
        let mut found = matches(&t.pattern);
        found.sort();
        assert_eq!(found, ["train_000001.bin", "train_000002.bin"]);
        let v = c.val.unwrap();
        assert_eq!((v.channel.as_str(), v.shards), ("val", 1));
        assert_eq!(matches(&v.pattern), ["val_000000.bin"]);
    }

    /// A ViT's data: image shards (with classes.txt beside them), never mixed with token shards.
    #[test]
    fn image_shards_make_an_image_pattern() {
        let (_d, p) = tree();
        touch(&p.channel_dir("train").join("train_000000.img"));
        touch(&p.channel_dir("train").join("classes.txt"));
        touch(&p.channel_dir("validation").join("val_000000.img"));
        let c = discover(&p, None).unwrap();
        let t = c.train.unwrap();
        assert_eq!(matches(&t.pattern), ["train_000000.img"]);
        assert_eq!(matches(&c.val.unwrap().pattern), ["val_000000.img"]);
        touch(&p.channel_dir("train").join("more/train_000001.bin"));
        let e = discover(&p, None).unwrap_err().to_string();
        assert!(e.contains("both token shards (more/train_000001.bin) and image shards (train_000000.img)"), "{e}");
        fs::remove_file(p.channel_dir("train").join("more/train_000001.bin")).unwrap();
        touch(&p.channel_dir("train").join("val_000000.img"));
        let e = discover(&p, None).unwrap_err().to_string();
        assert!(e.contains("val_000000.img") && e.contains("validation"), "{e}");
    }

    #[test]
    fn glob_characters_in_the_root_are_escaped() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path().join("ml[1]"));
        touch(&p.channel_dir("train").join("a.bin"));
        let t = discover(&p, None).unwrap().train.unwrap();
        assert_eq!(matches(&t.pattern), ["a.bin"]);
    }

    #[test]
    fn absent_channels_are_none_unless_declared() {
        let (_d, p) = tree();
        let c = discover(&p, None).unwrap();
        assert_eq!((c.train, c.val), (None, None));
        let cfg = InputDataConfig::parse(r#"{"train": {"TrainingInputMode": "File"}}"#, "idc.json").unwrap();
        let e = discover(&p, Some(&cfg)).unwrap_err().to_string();
        assert!(e.contains("channel train") && e.contains("does not exist"), "{e}");
    }

    #[test]
    fn empty_or_shardless_channel_is_an_error() {
        let (_d, p) = tree();
        fs::create_dir_all(p.channel_dir("train")).unwrap();
        let e = discover(&p, None).unwrap_err().to_string();
        assert!(e.contains("channel train") && e.contains("it is empty") && e.contains("trainer prepare"), "{e}");
        touch(&p.channel_dir("train").join("corpus.txt"));
        let e = discover(&p, None).unwrap_err().to_string();
        assert!(e.contains("1 other file(s): corpus.txt"), "{e}");
    }

    #[test]
    fn refusals() {
        let (_d, p) = tree();
        touch(&p.channel_dir("train").join("a.bin"));
        let pipe = InputDataConfig::parse(r#"{"train": {"TrainingInputMode": "Pipe"}}"#, "idc.json").unwrap();
        assert!(discover(&p, Some(&pipe)).unwrap_err().to_string().contains("Pipe"));

        touch(&p.channel_dir("validation").join("v.bin"));
        touch(&p.channel_dir("val").join("v.bin"));
        let e = discover(&p, None).unwrap_err().to_string();
        assert!(e.contains("both `validation` and `val`"), "{e}");
        fs::remove_dir_all(p.channel_dir("val")).unwrap();

        touch(&p.channel_dir("train").join("fineweb_val_000000.bin"));
        let e = discover(&p, None).unwrap_err().to_string();
        assert!(e.contains("fineweb_val_000000.bin") && e.contains("validation"), "{e}");
    }

    #[test]
    fn fast_file_and_sharded_channels() {
        let (_d, p) = tree();
        touch(&p.channel_dir("train").join("a.bin"));
        let cfg = InputDataConfig::parse(
            r#"{"train": {"TrainingInputMode": "FastFile", "S3DistributionType": "ShardedByS3Key",
                          "RecordWrapperType": "None", "ContentType": "application/octet-stream"}}"#,
            "idc.json",
        )
        .unwrap();
        let c = discover(&p, Some(&cfg)).unwrap();
        assert_eq!(c.train.unwrap().shards, 1);
        assert!(c.notes[0].contains("ShardedByS3Key"), "{:?}", c.notes);
        assert!(InputDataConfig::parse("[]", "idc.json").unwrap_err().to_string().contains("idc.json"));
    }
}
