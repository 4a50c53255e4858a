//! Python module `rustbpe`: parallel byte-level BPE training with tiktoken-compatible output.
//!
//! Drop-in replacement for the PyPI `rustbpe` 0.1.0 wheel (same `Tokenizer` API):
//!
//! ```python
//! tok = rustbpe.Tokenizer()
//! tok.train_from_iterator(texts, vocab_size=65536, pattern=SPLIT_PATTERN)
//! enc = tiktoken.Encoding("x", pat_str=tok.get_pattern(),
//!                         mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={...})
//! ```
//!
//! Beyond the PyPI API: `TIE_BREAK` (the documented tie rule; its presence marks this build),
//! `GPT4_PATTERN` (the default split pattern), `split_text(text, pattern=None)` (the chunks training
//! and encoding see) and `__version__`. Untrained tokenizers refuse to encode (the PyPI wheel
//! silently returns no ids), and bad arguments raise ValueError instead of panicking.

mod encode;
mod fxhash;
mod split;
mod train;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyIterator, PyTuple};
use rayon::prelude::*;

use crate::encode::Vocab;
use crate::fxhash::FxHashMap;
use crate::split::Splitter;
use crate::train::Pair;

/// A Byte Pair Encoding tokenizer that matches the GPT-4 style implementation
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    /// Learned merges in order; merge i created token 256 + i.
    merges: Vec<Pair>,
    /// Split pattern used for training and encoding ("" until trained, like the PyPI wheel).
    pattern: String,
    splitter: Option<Splitter>,
    vocab: Vocab,
}

/// Pull up to `limit` strings from the Python iterator into `buffer`; returns false once exhausted.
fn fill_buffer(iterator: &PyIterator, limit: usize, buffer: &mut Vec<String>) -> PyResult<bool> {
    buffer.clear();
    let mut iterator = iterator;
    while buffer.len() < limit {
        match iterator.next() {
            Some(item) => buffer.push(item?.extract::<String>()?),
            None => return Ok(false),
        }
    }
    Ok(true)
}

impl Tokenizer {
    fn trained_splitter(&self) -> PyResult<&Splitter> {
        self.splitter.as_ref().ok_or_else(|| {
            PyValueError::new_err("tokenizer is not trained: call train_from_iterator() first")
        })
    }

    fn encode_text(&self, splitter: &Splitter, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        splitter.for_each_chunk(text, |chunk| {
            self.vocab.encode_chunk(chunk.as_bytes(), &mut ids)
        })?;
        Ok(ids)
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    #[args(args = "*", kwargs = "**")]
    fn new(args: &PyTuple, kwargs: Option<&PyDict>) -> PyResult<Self> {
        // pyo3 0.17 would silently ignore stray constructor arguments; reject them like the PyPI wheel.
        if !args.is_empty() || kwargs.map_or(false, |k| !k.is_empty()) {
            return Err(PyTypeError::new_err("Tokenizer() takes no arguments"));
        }
        Ok(Tokenizer {
            merges: Vec::new(),
            pattern: String::new(),
            splitter: None,
            vocab: Vocab::from_merges(&[]),
        })
    }

    /// Train from a streaming iterator (parallel ingestion).
    /// We refill a Rust Vec<String> buffer under the GIL, then release the GIL
    /// to do the heavy splitting and counting **in parallel** with rayon.
    #[args(buffer_size = "8192", pattern = "None")]
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: u32,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte alphabet), got {}",
                vocab_size
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(split::default_pattern);
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let iterator = PyIterator::from_object(py, iterator)?;

        let mut chunk_counts: FxHashMap<String, i64> = FxHashMap::default();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        loop {
            let more = fill_buffer(iterator, buffer_size, &mut buffer)?;
            py.allow_threads(|| splitter.count_batch_into(&buffer, &mut chunk_counts))
                .map_err(PyRuntimeError::new_err)?;
            if !more {
                break;
            }
        }
        let merges = py.allow_threads(move || {
            let (words, counts) = train::words_from_chunks(chunk_counts);
            train::learn_merges(words, counts, vocab_size - 256)
        });
        self.vocab = Vocab::from_merges(&merges);
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = Some(splitter);
        Ok(())
    }

    /// Return the regex pattern
    #[pyo3(text_signature = "($self)")]
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Return the mergeable ranks (token bytes -> token id / rank)
    #[pyo3(text_signature = "($self)")]
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(&'py PyBytes, u32)> {
        self.vocab
            .tokens()
            .iter()
            .enumerate()
            .map(|(id, bytes)| (PyBytes::new(py, bytes), id as u32))
            .collect()
    }

    /// Return the vocabulary size (256 base bytes + number of merges)
    #[getter]
    fn vocab_size(&self) -> u32 {
        256 + self.merges.len() as u32
    }

    /// Encode a string into token IDs
    #[pyo3(text_signature = "($self, text)")]
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let splitter = self.trained_splitter()?;
        py.allow_threads(|| self.encode_text(splitter, text))
            .map_err(PyRuntimeError::new_err)
    }

    /// Encode multiple texts in parallel using rayon.
    /// Returns a list of token ID vectors, one per input text.
    #[pyo3(text_signature = "(self, texts)")]
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let splitter = self.trained_splitter()?;
        py.allow_threads(|| {
            texts
                .par_iter()
                .map(|text| self.encode_text(splitter, text))
                .collect::<Result<Vec<_>, String>>()
        })
        .map_err(PyRuntimeError::new_err)
    }

    /// Decode token IDs back to a string
    #[pyo3(text_signature = "($self, ids)")]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let bytes = self
            .vocab
            .decode_bytes(&ids)
            .map_err(|id| PyValueError::new_err(format!("Unknown token id: {}", id)))?;
        match std::str::from_utf8(&bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(err) => Err(PyErr::from_value(PyUnicodeDecodeError::new_utf8(
                py, &bytes, err,
            )?)),
        }
    }
}

/// The pre-tokenizer chunks of `text` under `pattern` (default: GPT-4's), as training and encoding
/// see them. Not part of the PyPI wheel's API; exported so tests can compare with the `regex` module.
#[pyfunction(pattern = "None")]
#[pyo3(text_signature = "(text, pattern=None)")]
fn split_text(py: Python<'_>, text: &str, pattern: Option<String>) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or_else(split::default_pattern);
    let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
    let mut chunks = Vec::new();
    py.allow_threads(|| splitter.for_each_chunk(text, |chunk| chunks.push(chunk.to_owned())))
        .map_err(PyRuntimeError::new_err)?;
    Ok(chunks)
}

#[pymodule]
fn rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add("TIE_BREAK", train::TIE_BREAK)?;
    m.add("GPT4_PATTERN", split::default_pattern())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
