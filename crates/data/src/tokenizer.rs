//! Tokenizers: any Hugging Face tokenizer.json, or GPT-2's byte-level BPE built
//! offline from the vocabulary that the tiktoken-rs crate embeds (nothing is
//! downloaded at run time).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::{Error, Result};

/// GPT-2's end-of-text token.
pub const GPT2_EOT: &str = "<|endoftext|>";

#[derive(Debug)]
pub struct Tokenizer {
    name: String,
    inner: tokenizers::Tokenizer,
    eot: u32,
    vocab_size: usize,
}

impl Tokenizer {
    /// "gpt2" for the built-in GPT-2 tokenizer, else a path to a tokenizer.json.
    pub fn load(spec: &str) -> Result<Self> {
        if spec == "gpt2" { Self::gpt2() } else { Self::from_file(Path::new(spec)) }
    }

    /// GPT-2's tokenizer (50257 tokens, end-of-text 50256).
    ///
    /// tiktoken's r50k_base ranks are GPT-2's token ids: 256 single bytes, then
    /// one token per BPE merge in merge order. A merge's two halves are recovered
    /// by running byte-pair encoding on the token's bytes with only the merges of
    /// lower rank, which leaves exactly two parts.
    pub fn gpt2() -> Result<Self> {
        let err = |msg: String| Error::Tokenizer { name: "gpt2".into(), msg };
        let bpe = tiktoken_rs::r50k_base().map_err(|e| err(e.to_string()))?;
        let eot = 50256u32;
        let mut bytes_of = Vec::with_capacity(eot as usize);
        for rank in 0..eot {
            bytes_of.push(bpe.decode_bytes(&[rank]).map_err(|e| err(e.to_string()))?);
        }
        let rank_of: HashMap<&[u8], u32> = bytes_of.iter().enumerate().map(|(r, b)| (b.as_slice(), r as u32)).collect();
        let unicode = byte_to_unicode();
        let text = |b: &[u8]| b.iter().map(|&x| unicode[x as usize]).collect::<String>();

        let mut vocab: Vocab = bytes_of.iter().enumerate().map(|(r, b)| (text(b), r as u32)).collect();
        vocab.insert(GPT2_EOT.into(), eot);
        let mut merges = Vec::with_capacity(bytes_of.len());
        for (rank, token) in bytes_of.iter().enumerate().filter(|(_, b)| b.len() > 1) {
            let parts = byte_pair_split(token, &rank_of, rank as u32);
            let [a, b] = parts.as_slice() else {
                return Err(err(format!("token {rank} does not split into one merge")));
            };
            merges.push((text(a), text(b)));
        }
        let model = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // The end-of-text token is kept out of the tokenizer's added tokens: text
        // that happens to contain "<|endoftext|>" is encoded as plain text (as
        // tiktoken's encode_ordinary does); documents are separated by the id.
        Ok(Tokenizer { name: "gpt2".into(), inner, eot, vocab_size: eot as usize + 1 })
    }

    /// A Hugging Face tokenizer.json. Its end-of-text token is the first of
    /// "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>" that it defines.
    pub fn from_file(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let err = |msg: String| Error::Tokenizer { name: name.clone(), msg };
        if !path.is_file() {
            return Err(err("no such file (give \"gpt2\" or the path of a tokenizer.json)".into()));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let eot = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                err("defines none of <|endoftext|>, </s>, <|end_of_text|>, <eos> to separate documents".into())
            })?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer { name, inner, eot, vocab_size })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id placed between documents.
    pub fn eot(&self) -> u32 {
        self.eot
    }

    /// Number of ids, special tokens included: every id is below this.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer { name: self.name.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        // The end-of-text id is not an added token of the GPT-2 build; spell it out.
        let mut out = String::new();
        for (i, part) in ids.split(|&id| id == self.eot).enumerate() {
            if i > 0 {
                out.push_str(GPT2_EOT);
            }
            out += &self
                .inner
                .decode(part, false)
                .map_err(|e| Error::Tokenizer { name: self.name.clone(), msg: e.to_string() })?;
        }
        Ok(out)
    }

    /// Saves the tokenizer as a tokenizer.json (loadable by `load` and by HF).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer { name: self.name.clone(), msg: format!("saving {}: {e}", path.display()) })
    }
}

/// GPT-2's reversible map from bytes to printable unicode characters: printable
/// Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order.
fn byte_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// Byte-pair encodes `piece` using only tokens of rank below `max_rank`:
/// repeatedly merges the adjacent pair whose union has the lowest rank.
fn byte_pair_split<'a>(piece: &'a [u8], rank_of: &HashMap<&[u8], u32>, max_rank: u32) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = (0..=piece.len()).collect();
    loop {
        let best = (0..bounds.len().saturating_sub(2))
            .filter_map(|i| rank_of.get(&piece[bounds[i]..bounds[i + 2]]).filter(|&&r| r < max_rank).map(|&r| (r, i)))
            .min();
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => break,
        }
    }
    bounds.windows(2).map(|w| &piece[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_known_ids_and_round_trip() {
        let tok = Tokenizer::gpt2().unwrap();
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eot(), 50256);
        // Ids published with GPT-2 and reproduced by every GPT-2 tokenizer.
        assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(tok.encode(" the").unwrap(), vec![262]);
        let text = "In the beginning God created the heaven and the earth.\n\n  Ünïcödé, 123 + 4.5e6 'tis done!";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // The special string inside text stays text.
        assert!(!tok.encode("a<|endoftext|>b").unwrap().contains(&50256));
        assert_eq!(tok.decode(&[15496, 50256, 995]).unwrap(), "Hello<|endoftext|> world");
    }

    #[test]
    fn gpt2_agrees_with_tiktoken() {
        // Two independent implementations of the same BPE must agree exactly.
        let tok = Tokenizer::gpt2().unwrap();
        let tt = tiktoken_rs::r50k_base().unwrap();
        let texts = [
            "And God said, Let there be light: and there was light.",
            "  leading spaces\tand tabs\n\nnew   lines   \n",
            "numbers 1234567 and symbols #$%^&*() -- don't we'll they're",
            "日本語のテキストと emoji 🎉🎉",
        ];
        for t in texts {
            assert_eq!(tok.encode(t).unwrap(), tt.encode_ordinary(t), "{t:?}");
        }
    }

    #[test]
    fn saved_tokenizer_json_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        let tok = Tokenizer::gpt2().unwrap();
        tok.save(&p).unwrap();
        let back = Tokenizer::from_file(&p).unwrap();
        assert_eq!(back.eot(), 50256);
        assert_eq!(back.vocab_size(), 50257);
        let text = "Then said he unto them, Render therefore unto Caesar.";
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
        let missing = Tokenizer::load("/nonexistent/tokenizer.json").unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/tokenizer.json"), "{missing}");
    }
}
