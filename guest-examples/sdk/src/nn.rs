//! WASI-NN (import module `wasi_ephemeral_nn`) as WasmEdge defines it, with the API shape of the
//! upstream `wasmedge-wasi-nn` guest crate: [`GraphBuilder`] → [`Graph`] →
//! [`GraphExecutionContext`] with `set_input`, `compute`, `get_output` and the streaming trio
//! `compute_single` / `get_output_single` / `fini_single`.
//!
//! ```no_run
//! use wasmflow::nn::{ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};
//!
//! let graph = GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
//!     .config(r#"{"n-predict": 64, "temp": 0}"#.to_string())
//!     .build_from_cache("default")?;
//! let mut ctx = graph.init_execution_context()?;
//! ctx.set_input(0, TensorType::U8, &[1], "Once upon a time".as_bytes())?;
//! ctx.compute()?;
//! let mut out = vec![0u8; 4096];
//! let n = ctx.get_output(0, &mut out)?;
//! # Ok::<(), wasmflow::nn::Error>(())
//! ```
//!
//! Numbering follows WasmEdge 0.15 and later (tensor type `U8` is 3). Error codes are WASI-NN's, not
//! the `wasmflow` module's: see [`BackendError`].

use std::fmt;

/// The raw imports, exactly as WasmEdge declares them (every parameter and result an `i32`).
pub mod sys {
    #![allow(missing_docs)]

    /// The 20-byte tensor struct: dims pointer and count, type word, data pointer and length.
    #[repr(C)]
    pub struct Tensor {
        pub dims_ptr: *const u32,
        pub dims_len: u32,
        pub ty: u32,
        pub data_ptr: *const u8,
        pub data_len: u32,
    }

    /// One graph builder: a pointer and a length.
    #[repr(C)]
    pub struct Builder {
        pub ptr: *const u8,
        pub len: u32,
    }

    #[link(wasm_import_module = "wasi_ephemeral_nn")]
    extern "C" {
        pub fn load(builders: *const Builder, count: u32, encoding: u32, target: u32, graph_out: *mut u32) -> u32;
        pub fn load_by_name(name_ptr: *const u8, name_len: u32, graph_out: *mut u32) -> u32;
        pub fn load_by_name_with_config(
            name_ptr: *const u8,
            name_len: u32,
            config_ptr: *const u8,
            config_len: u32,
            graph_out: *mut u32,
        ) -> u32;
        pub fn init_execution_context(graph: u32, ctx_out: *mut u32) -> u32;
        pub fn set_input(ctx: u32, index: u32, tensor: *const Tensor) -> u32;
        pub fn compute(ctx: u32) -> u32;
        pub fn get_output(ctx: u32, index: u32, out_ptr: *mut u8, out_max: u32, written: *mut u32) -> u32;
        pub fn compute_single(ctx: u32) -> u32;
        pub fn get_output_single(ctx: u32, index: u32, out_ptr: *mut u8, out_max: u32, written: *mut u32) -> u32;
        pub fn fini_single(ctx: u32) -> u32;
        pub fn unload(graph: u32) -> u32;
        pub fn finalize_execution_context(ctx: u32) -> u32;
    }
}

/// Model formats (WasmEdge's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum GraphEncoding {
    Openvino = 0,
    Onnx = 1,
    Tensorflow = 2,
    Pytorch = 3,
    TensorflowLite = 4,
    Autodetect = 5,
    Ggml = 6,
}

/// Where the host should run the model. `AUTO` is only meaningful for preloaded models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ExecutionTarget {
    CPU = 0,
    GPU = 1,
    TPU = 2,
    AUTO = 3,
}

/// Tensor element types (WasmEdge 0.15 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum TensorType {
    F16 = 0,
    F32 = 1,
    F64 = 2,
    U8 = 3,
    I32 = 4,
    I64 = 5,
}

/// A WASI-NN error code from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// 1: a bad argument (a handle, an index, a pointer outside memory, a tensor that does not fit).
    InvalidArgument,
    /// 2: an unknown encoding, or metadata that is not JSON.
    InvalidEncoding,
    /// 3: the guest exports no memory.
    MissingMemory,
    /// 4: no model context became free in time.
    Busy,
    /// 5: the back end failed.
    RuntimeError,
    /// 6: not possible with this back end (e.g. streaming on ONNX).
    UnsupportedOperation,
    /// 7: an output larger than the buffer (the needed size is in [`Error::needed`]).
    TooLarge,
    /// 8: no such model (or not one this flow may use).
    NotFound,
    /// 100: generation ended.
    EndOfSequence,
    /// 101: the context window is full.
    ContextFull,
    /// 102: the prompt does not fit in the context.
    PromptTooLong,
    /// 103: the model's file is missing.
    ModelNotFound,
    /// A code this crate does not know.
    Unknown(u32),
}

impl BackendError {
    /// The error of a non-zero code.
    pub fn from_code(code: u32) -> BackendError {
        match code {
            1 => BackendError::InvalidArgument,
            2 => BackendError::InvalidEncoding,
            3 => BackendError::MissingMemory,
            4 => BackendError::Busy,
            5 => BackendError::RuntimeError,
            6 => BackendError::UnsupportedOperation,
            7 => BackendError::TooLarge,
            8 => BackendError::NotFound,
            100 => BackendError::EndOfSequence,
            101 => BackendError::ContextFull,
            102 => BackendError::PromptTooLong,
            103 => BackendError::ModelNotFound,
            other => BackendError::Unknown(other),
        }
    }

    /// The WASI-NN code.
    pub fn code(&self) -> u32 {
        match self {
            BackendError::InvalidArgument => 1,
            BackendError::InvalidEncoding => 2,
            BackendError::MissingMemory => 3,
            BackendError::Busy => 4,
            BackendError::RuntimeError => 5,
            BackendError::UnsupportedOperation => 6,
            BackendError::TooLarge => 7,
            BackendError::NotFound => 8,
            BackendError::EndOfSequence => 100,
            BackendError::ContextFull => 101,
            BackendError::PromptTooLong => 102,
            BackendError::ModelNotFound => 103,
            BackendError::Unknown(c) => *c,
        }
    }
}

/// What a WASI-NN call returns on failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The host returned a WASI-NN error code.
    BackendError(BackendError),
    /// A buffer was too small: `needed` bytes are required (from a host that reports it).
    OutputTooLarge {
        /// Bytes the output needs.
        needed: usize,
    },
    /// The guest could not read a model file (build_from_files).
    IoError(String),
}

impl Error {
    /// The backend error, if the host returned one.
    pub fn backend(&self) -> Option<BackendError> {
        match self {
            Error::BackendError(e) => Some(*e),
            Error::OutputTooLarge { .. } => Some(BackendError::TooLarge),
            Error::IoError(_) => None,
        }
    }

    /// The size an output needs, after a too-large error.
    pub fn needed(&self) -> Option<usize> {
        match self {
            Error::OutputTooLarge { needed } => Some(*needed),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BackendError(e) => write!(f, "wasi-nn error {} ({:?})", e.code(), e),
            Error::OutputTooLarge { needed } => write!(f, "wasi-nn output needs {} bytes", needed),
            Error::IoError(m) => write!(f, "io error: {}", m),
        }
    }
}

impl std::error::Error for Error {}

fn check(code: u32) -> Result<(), Error> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::BackendError(BackendError::from_code(code)))
    }
}

/// Builds a [`Graph`]: from model bytes, from files the guest can read, or from a model the host
/// preloaded (by name).
#[derive(Debug, Clone)]
pub struct GraphBuilder {
    encoding: GraphEncoding,
    target: ExecutionTarget,
    config: Option<String>,
}

impl GraphBuilder {
    /// A builder for a model of `encoding` to run on `target`.
    pub fn new(encoding: GraphEncoding, target: ExecutionTarget) -> Self {
        GraphBuilder { encoding, target, config: None }
    }

    /// JSON configuration: the metadata keys of the back end (for GGML `ctx-size`, `n-gpu-layers`...).
    pub fn config(mut self, config: String) -> Self {
        self.config = Some(config);
        self
    }

    /// Load from in-memory builders (for GGML: the GGUF bytes or `preload:<path>`; the config is
    /// appended as the last builder).
    pub fn build_from_bytes<B: AsRef<[u8]>>(self, bytes_array: impl IntoIterator<Item = B>) -> Result<Graph, Error> {
        let owned: Vec<B> = bytes_array.into_iter().collect();
        let mut builders: Vec<sys::Builder> = owned
            .iter()
            .map(|b| sys::Builder { ptr: b.as_ref().as_ptr(), len: b.as_ref().len() as u32 })
            .collect();
        if let Some(cfg) = &self.config {
            builders.push(sys::Builder { ptr: cfg.as_ptr(), len: cfg.len() as u32 });
        }
        let mut handle = 0u32;
        check(unsafe {
            sys::load(builders.as_ptr(), builders.len() as u32, self.encoding as u32, self.target as u32, &mut handle)
        })?;
        Ok(Graph { encoding: self.encoding, target: self.target, handle })
    }

    /// Load from files the guest can read (preopened directories).
    pub fn build_from_files<P: AsRef<std::path::Path>>(self, files: impl IntoIterator<Item = P>) -> Result<Graph, Error> {
        let mut contents = Vec::new();
        for f in files {
            contents.push(std::fs::read(f.as_ref()).map_err(|e| Error::IoError(e.to_string()))?);
        }
        self.build_from_bytes(contents)
    }

    /// Load a model the host registered under `name` (flows.yaml `models:` or `--nn-preload`). With a
    /// config, `load_by_name_with_config`; the host caches by name, so a second load of the same name
    /// in a run returns the same graph.
    pub fn build_from_cache(self, name: &str) -> Result<Graph, Error> {
        let mut handle = 0u32;
        let code = match &self.config {
            Some(cfg) => unsafe {
                sys::load_by_name_with_config(name.as_ptr(), name.len() as u32, cfg.as_ptr(), cfg.len() as u32, &mut handle)
            },
            None => unsafe { sys::load_by_name(name.as_ptr(), name.len() as u32, &mut handle) },
        };
        check(code)?;
        Ok(Graph { encoding: self.encoding, target: self.target, handle })
    }
}

/// A loaded model (a handle of this run).
#[derive(Debug)]
pub struct Graph {
    encoding: GraphEncoding,
    target: ExecutionTarget,
    handle: u32,
}

impl Graph {
    /// The encoding it was built with.
    pub fn encoding(&self) -> GraphEncoding {
        self.encoding
    }

    /// The target it was built for.
    pub fn execution_target(&self) -> ExecutionTarget {
        self.target
    }

    /// The raw graph handle.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// A new execution context: its own inputs, outputs and (for GGML) generation state.
    pub fn init_execution_context(&self) -> Result<GraphExecutionContext<'_>, Error> {
        let mut ctx = 0u32;
        check(unsafe { sys::init_execution_context(self.handle, &mut ctx) })?;
        Ok(GraphExecutionContext { graph: self, handle: ctx })
    }

    /// Drop the run's handle (the host keeps the model loaded for other runs).
    pub fn unload(self) -> Result<(), Error> {
        check(unsafe { sys::unload(self.handle) })
    }
}

/// An execution context of a [`Graph`].
#[derive(Debug)]
pub struct GraphExecutionContext<'a> {
    /// The graph this context runs.
    pub graph: &'a Graph,
    handle: u32,
}

fn output_call(
    f: unsafe extern "C" fn(u32, u32, *mut u8, u32, *mut u32) -> u32,
    ctx: u32,
    index: usize,
    buf: &mut [u8],
) -> Result<usize, Error> {
    let mut written = 0u32;
    let code = unsafe { f(ctx, index as u32, buf.as_mut_ptr(), buf.len() as u32, &mut written) };
    if code == 7 {
        return Err(Error::OutputTooLarge { needed: written as usize });
    }
    check(code)?;
    Ok(written as usize)
}

impl<'a> GraphExecutionContext<'a> {
    /// The raw context handle.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// Set input `index` from a slice of plain values (`u8` for text and JSON, `f32`, `i64`...).
    pub fn set_input<T: Copy>(&mut self, index: usize, tensor_type: TensorType, dimensions: &[usize], data: impl AsRef<[T]>) -> Result<(), Error> {
        let dims: Vec<u32> = dimensions.iter().map(|d| *d as u32).collect();
        let data = data.as_ref();
        let tensor = sys::Tensor {
            dims_ptr: dims.as_ptr(),
            dims_len: dims.len() as u32,
            ty: tensor_type as u32,
            data_ptr: data.as_ptr() as *const u8,
            data_len: std::mem::size_of_val(data) as u32,
        };
        check(unsafe { sys::set_input(self.handle, index as u32, &tensor) })
    }

    /// Run the model on the inputs set (for GGML: generate the whole answer).
    pub fn compute(&mut self) -> Result<(), Error> {
        check(unsafe { sys::compute(self.handle) })
    }

    /// Copy output `index` into `out_buffer`; returns the bytes written. A buffer that is too small
    /// gives [`Error::OutputTooLarge`] with the size needed.
    pub fn get_output<T: Copy>(&self, index: usize, out_buffer: &mut [T]) -> Result<usize, Error> {
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(out_buffer.as_mut_ptr() as *mut u8, std::mem::size_of_val(out_buffer))
        };
        output_call(sys::get_output, self.handle, index, bytes)
    }

    /// Output `index` as a byte vector, growing the buffer if the host says it is too small.
    pub fn get_output_vec(&self, index: usize, initial: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; initial.max(1)];
        loop {
            match self.get_output(index, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Error::OutputTooLarge { needed }) if needed > buf.len() => buf.resize(needed, 0),
                Err(e) => return Err(e),
            }
        }
    }

    /// GGML streaming: evaluate the prompt on the first call, then sample one token per call.
    /// `Err(BackendError(EndOfSequence | ContextFull | PromptTooLong))` ends the stream.
    pub fn compute_single(&mut self) -> Result<(), Error> {
        check(unsafe { sys::compute_single(self.handle) })
    }

    /// GGML streaming: the newest token's text (index 0) or the metadata JSON (index 1).
    pub fn get_output_single<T: Copy>(&self, index: usize, out_buffer: &mut [T]) -> Result<usize, Error> {
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(out_buffer.as_mut_ptr() as *mut u8, std::mem::size_of_val(out_buffer))
        };
        output_call(sys::get_output_single, self.handle, index, bytes)
    }

    /// GGML streaming: end the stream (clears outputs, resets the sampler and position).
    pub fn fini_single(&mut self) -> Result<(), Error> {
        check(unsafe { sys::fini_single(self.handle) })
    }
}

impl<'a> Drop for GraphExecutionContext<'a> {
    fn drop(&mut self) {
        unsafe {
            sys::finalize_execution_context(self.handle);
        }
    }
}

/// Is this error the normal end of a stream (end of sequence or a full context)?
pub fn is_end_of_stream(err: &Error) -> bool {
    matches!(
        err.backend(),
        Some(BackendError::EndOfSequence) | Some(BackendError::ContextFull)
    )
}
