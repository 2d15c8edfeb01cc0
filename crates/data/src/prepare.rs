//! `trainer prepare`: text files to token shards.
//!
//! Inputs are .txt files (one document each) and .jsonl files (one document per
//! line, in a "text" field), or directories holding them. Documents are
//! tokenized in parallel, batch by batch so memory stays bounded on large
//! corpora, and written in input order, each preceded by the end-of-text token
//! (the separator llm.c and modded-nanogpt use). The first `val_tokens` tokens go
//! to validation shards, the rest to training shards of `shard_tokens` each.

use std::fs;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::{Error, Result, Tokenizer, io_err, write_shard};

/// Tokenize this much text per parallel batch.
const BATCH_BYTES: usize = 16 << 20;

#[derive(Debug)]
pub struct PrepareOptions<'a> {
    pub inputs: Vec<PathBuf>,
    pub output_dir: PathBuf,
    pub tokenizer: &'a Tokenizer,
    pub val_tokens: usize,
    pub shard_tokens: usize,
    /// Replace shards an earlier run left in output_dir (only our own names).
    pub overwrite: bool,
}

#[derive(Debug)]
pub struct PrepareReport {
    pub documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub files: Vec<PathBuf>,
}

pub fn prepare(opts: &PrepareOptions<'_>) -> Result<PrepareReport> {
    if opts.shard_tokens == 0 || opts.val_tokens == 0 {
        return Err(Error::Invalid("--shard-tokens and --val-tokens must be at least 1".into()));
    }
    let files = input_files(&opts.inputs)?;
    clear_or_refuse(&opts.output_dir, opts.overwrite)?;

    let total_bytes: u64 = files.iter().map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(total_bytes) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} tokenizing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let mut writer = ShardWriter::new(opts);
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0;
    let mut documents = 0;
    for file in &files {
        for_each_document(file, |doc| {
            batch_bytes += doc.len();
            batch.push(doc);
            if batch_bytes >= BATCH_BYTES {
                documents += writer.write_batch(std::mem::take(&mut batch))?;
                bar.inc(batch_bytes as u64);
                batch_bytes = 0;
            }
            Ok(())
        })?;
    }
    documents += writer.write_batch(batch)?;
    bar.finish_and_clear();
    writer.finish(documents)
}

/// Expands directories (recursively, sorted) and checks every file's type.
fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .map(|e| e.map(|e| e.path()).map_err(|err| io_err(dir, err)))
            .collect::<Result<_>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl")) {
                out.push(p);
            }
        }
        Ok(())
    }
    if inputs.is_empty() {
        return Err(Error::Invalid("no inputs given: name .txt or .jsonl files, or directories of them".into()));
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                return Err(Error::Input {
                    path: input.display().to_string(),
                    line: None,
                    msg: "directory holds no .txt or .jsonl files".into(),
                });
            }
        } else if !input.exists() {
            return Err(Error::Input { path: input.display().to_string(), line: None, msg: "no such file".into() });
        } else if matches!(input.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl")) {
            files.push(input.clone());
        } else {
            return Err(Error::Input {
                path: input.display().to_string(),
                line: None,
                msg: "unsupported input type: allowed are .txt (one document) and .jsonl (a \"text\" field per line)"
                    .into(),
            });
        }
    }
    Ok(files)
}

fn is_our_shard(name: &str) -> bool {
    (name.starts_with("train_") || name.starts_with("val_")) && (name.ends_with(".bin") || name.ends_with(".img"))
}

/// Creates `dir` if needed; removes the shards a previous prepare left
/// there with `overwrite`, else refuses to mix two data sets.
pub(crate) fn clear_or_refuse(dir: &Path, overwrite: bool) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if is_our_shard(name) {
            if !overwrite {
                return Err(Error::Input {
                    path: dir.display().to_string(),
                    line: None,
                    msg: format!("already holds shards ({name}); pass --overwrite to replace them"),
                });
            }
            fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        }
    }
    Ok(())
}

/// Calls `f` with each document of `file`, in order.
fn for_each_document(file: &Path, mut f: impl FnMut(String) -> Result<()>) -> Result<()> {
    let input_err = |line: Option<usize>, msg: String| Error::Input { path: file.display().to_string(), line, msg };
    if file.extension().and_then(|e| e.to_str()) == Some("txt") {
        let bytes = fs::read(file).map_err(|e| io_err(file, e))?;
        let text = String::from_utf8(bytes).map_err(|e| input_err(None, format!("not UTF-8 text: {e}")))?;
        return f(text);
    }
    let reader = BufReader::new(fs::File::open(file).map_err(|e| io_err(file, e))?);
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| input_err(Some(i + 1), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| input_err(Some(i + 1), format!("not a JSON object: {e}")))?;
        let text = value
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| input_err(Some(i + 1), "no string field \"text\"".into()))?;
        f(text.to_owned())?;
    }
    Ok(())
}

/// Routes the token stream into validation then training shards.
struct ShardWriter<'a> {
    opts: &'a PrepareOptions<'a>,
    val: Vec<u32>,
    train: Vec<u32>,
    val_total: usize,
    train_total: usize,
    files: Vec<PathBuf>,
}

impl<'a> ShardWriter<'a> {
    fn new(opts: &'a PrepareOptions<'a>) -> Self {
        ShardWriter { opts, val: Vec::new(), train: Vec::new(), val_total: 0, train_total: 0, files: Vec::new() }
    }

    /// Tokenizes a batch of documents in parallel and appends them in order.
    fn write_batch(&mut self, docs: Vec<String>) -> Result<usize> {
        let tok = self.opts.tokenizer;
        let encoded: Vec<Vec<u32>> = docs.par_iter().map(|d| tok.encode(d)).collect::<Result<_>>()?;
        for ids in &encoded {
            self.push(tok.eot())?;
            for &id in ids {
                self.push(id)?;
            }
        }
        Ok(docs.len())
    }

    fn push(&mut self, id: u32) -> Result<()> {
        if self.val_total < self.opts.val_tokens {
            self.val.push(id);
            self.val_total += 1;
            if self.val.len() == self.opts.shard_tokens {
                self.flush_val()?;
            }
        } else {
            self.train.push(id);
            self.train_total += 1;
            if self.train.len() == self.opts.shard_tokens {
                self.flush_train()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, kind: &str) -> Result<()> {
        let buf = if kind == "val" { &mut self.val } else { &mut self.train };
        if buf.is_empty() {
            return Ok(());
        }
        let index =
            self.files.iter().filter(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with(kind))).count();
        let path = self.opts.output_dir.join(format!("{kind}_{index:06}.bin"));
        write_shard(&path, buf)?;
        buf.clear();
        self.files.push(path);
        Ok(())
    }

    fn flush_val(&mut self) -> Result<()> {
        self.flush("val")
    }

    fn flush_train(&mut self) -> Result<()> {
        self.flush("train")
    }

    fn finish(mut self, documents: usize) -> Result<PrepareReport> {
        if self.train_total == 0 {
            return Err(Error::Invalid(format!(
                "the inputs hold only {} tokens, all taken by --val-tokens {}: lower --val-tokens or add text",
                self.val_total, self.opts.val_tokens
            )));
        }
        self.flush_val()?;
        self.flush_train()?;
        Ok(PrepareReport { documents, train_tokens: self.train_total, val_tokens: self.val_total, files: self.files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Shard;

    fn read_all(p: &Path) -> Vec<u32> {
        let s = Shard::open(p).unwrap();
        let mut v = vec![0; s.len()];
        s.read(0, &mut v);
        v
    }

    #[test]
    fn txt_and_jsonl_become_val_then_train_shards() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::create_dir_all(input.join("sub")).unwrap();
        fs::write(input.join("a.txt"), "Hello world").unwrap();
        fs::write(input.join("sub/b.jsonl"), "{\"text\": \" the\"}\n\n{\"text\": \"Hello\", \"id\": 3}\n").unwrap();
        fs::write(input.join("ignored.csv"), "x").unwrap();
        let tok = Tokenizer::gpt2().unwrap();
        let out = dir.path().join("out");
        let mut opts = PrepareOptions {
            inputs: vec![input.clone()],
            output_dir: out.clone(),
            tokenizer: &tok,
            val_tokens: 2,
            shard_tokens: 3,
            overwrite: false,
        };
        let r = prepare(&opts).unwrap();
        assert_eq!(r.documents, 3);
        // Stream: EOT Hello world | EOT the | EOT Hello
        let stream = [50256, 15496, 995, 50256, 262, 50256, 15496];
        assert_eq!((r.val_tokens, r.train_tokens), (2, 5));
        assert_eq!(read_all(&out.join("val_000000.bin")), stream[..2]);
        assert_eq!(read_all(&out.join("train_000000.bin")), stream[2..5]);
        assert_eq!(read_all(&out.join("train_000001.bin")), stream[5..]);

        let again = prepare(&opts).unwrap_err().to_string();
        assert!(again.contains("--overwrite"), "{again}");
        opts.overwrite = true;
        prepare(&opts).unwrap();
    }

    #[test]
    fn bad_inputs_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::gpt2().unwrap();
        let run = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            fs::write(&p, content).unwrap();
            let opts = PrepareOptions {
                inputs: vec![p],
                output_dir: dir.path().join(format!("out_{name}")),
                tokenizer: &tok,
                val_tokens: 1,
                shard_tokens: 100,
                overwrite: false,
            };
            prepare(&opts).unwrap_err().to_string()
        };
        let e = run("x.jsonl", b"{\"text\": \"ok\"}\n{\"body\": 1}\n");
        assert!(e.contains("x.jsonl:2") && e.contains("\"text\""), "{e}");
        let e = run("y.jsonl", b"not json\n");
        assert!(e.contains("y.jsonl:1"), "{e}");
        let e = run("z.txt", b"\xff\xfe");
        assert!(e.contains("z.txt") && e.contains("UTF-8"), "{e}");
        let e = run("w.csv", b"a,b");
        assert!(e.contains("w.csv") && e.contains(".jsonl"), "{e}");
        let e = run("empty.txt", b"");
        assert!(e.contains("--val-tokens"), "{e}");
    }
}
