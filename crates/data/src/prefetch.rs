//! A loader that fills the next micro-batches on a thread of its own while
//! the model computes, so that a GPU waits on decoding, cropping and copying
//! only when the loader is slower than the step. It hands out exactly the
//! batches, and reports exactly the positions, of the loader it wraps: the
//! wrapped loader runs ahead, and each batch travels with the position after it.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use crate::{Batch, Loader, LoaderPosition};

/// Batches filled ahead of the consumer.
const DEPTH: usize = 2;

/// A loader for the prefetching thread.
pub type SendLoader = Box<dyn Loader + Send>;

#[derive(Debug)]
struct Worker {
    /// Filled batches, each with the wrapped loader's position after it.
    filled: Receiver<(Batch, LoaderPosition)>,
    /// Emptied buffers back to the worker; dropping it stops the worker.
    empty: Sender<Batch>,
    handle: JoinHandle<SendLoader>,
}

/// See the module comment.
#[derive(Debug)]
pub struct Prefetcher {
    /// The wrapped loader while no worker runs (before the first batch and after a seek).
    idle: Option<SendLoader>,
    worker: Option<Worker>,
    template: Batch,
    pos: LoaderPosition,
    micro_batches: usize,
    batches_per_epoch: usize,
}

impl Prefetcher {
    pub fn new(inner: SendLoader) -> Self {
        Prefetcher {
            template: inner.new_batch(),
            pos: inner.position(),
            micro_batches: inner.micro_batches(),
            batches_per_epoch: inner.batches_per_epoch(),
            idle: Some(inner),
            worker: None,
        }
    }

    fn start(&mut self) {
        let Some(mut loader) = self.idle.take() else { return };
        let (filled_tx, filled) = channel();
        let (empty, empty_rx) = channel::<Batch>();
        for _ in 0..DEPTH {
            // Cannot fail: the receiver is alive.
            let _ = empty.send(self.template.clone());
        }
        let handle = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                // Until the consumer drops its sender (a seek, or the end) or its receiver.
                while let Ok(mut batch) = empty_rx.recv() {
                    loader.next_batch(&mut batch);
                    if filled_tx.send((batch, loader.position())).is_err() {
                        break;
                    }
                }
                loader
            })
            .unwrap_or_else(|e| panic!("cannot start the data prefetch thread: {e}"));
        self.worker = Some(Worker { filled, empty, handle });
    }

    /// Stops the worker and takes the wrapped loader back (positioned after
    /// the batches it filled, which are dropped).
    fn stop(&mut self) {
        let Some(Worker { filled, empty, handle }) = self.worker.take() else { return };
        drop(empty);
        drop(filled);
        match handle.join() {
            Ok(loader) => self.idle = Some(loader),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Loader for Prefetcher {
    fn new_batch(&self) -> Batch {
        self.template.clone()
    }

    fn next_batch(&mut self, batch: &mut Batch) {
        self.start();
        let Some(worker) = self.worker.as_ref() else { unreachable!("start() leaves a worker") };
        match worker.filled.recv() {
            Ok((mut next, pos)) => {
                std::mem::swap(batch, &mut next);
                // The worker may have stopped on its own only by panicking; stop() reports that.
                if worker.empty.send(next).is_err() {
                    self.stop();
                }
                self.pos = pos;
            }
            // The worker ended without a batch: it panicked; stop() passes the panic on.
            Err(_) => self.stop(),
        }
    }

    fn position(&self) -> LoaderPosition {
        self.pos
    }

    fn seek(&mut self, pos: LoaderPosition) {
        self.stop();
        if let Some(loader) = self.idle.as_mut() {
            loader.seek(pos);
        }
        self.pos = pos;
    }

    fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        if let Some(Worker { filled, empty, handle }) = self.worker.take() {
            drop(empty);
            drop(filled);
            // A worker's panic was already reported by the batch it failed; nothing to add at drop.
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchLoader, write_shard};

    fn loader(dir: &std::path::Path) -> BatchLoader {
        let tokens: Vec<u32> = (0..5000u32).map(|i| i * 7 % 1000).collect();
        let path = dir.join("train_000000.bin");
        write_shard(&path, &tokens).unwrap();
        BatchLoader::new(vec![crate::Shard::open(&path).unwrap()], 2, 8, 3, true, 0, 1).unwrap()
    }

    /// The same batches and positions as the wrapped loader, across epochs and seeks.
    #[test]
    fn hands_out_what_the_wrapped_loader_would() {
        let dir = tempfile::tempdir().unwrap();
        let mut plain = loader(dir.path());
        let mut pre = Prefetcher::new(Box::new(loader(dir.path())));
        assert_eq!(pre.batches_per_epoch(), Loader::batches_per_epoch(&plain));
        let (mut a, mut b) = (Loader::new_batch(&plain), pre.new_batch());
        let steps = 2 * Loader::batches_per_epoch(&plain) + 5;
        for i in 0..steps {
            if i == 40 {
                // A resume: both jump back.
                let to = LoaderPosition { epoch: 0, index: 7 };
                Loader::seek(&mut plain, to);
                pre.seek(to);
            }
            Loader::next_batch(&mut plain, &mut a);
            pre.next_batch(&mut b);
            assert_eq!(a, b, "batch {i}");
            assert_eq!(Loader::position(&plain), pre.position(), "position after batch {i}");
        }
    }
}
