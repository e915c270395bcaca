//! Serving a language model: compute threads (instances) per served version,
//! each owning a copy of the network, that take the version's work in
//! arrival order from one queue: next-token logits for OIP `infer` on token
//! ids, and generation for Triton's generate extension (`/generate`,
//! `/generate_stream`).
//!
//! `infer` requests are batched dynamically as a classifier's are (see
//! [`crate::batcher`]): a free instance takes the oldest request and the
//! queued requests whose sequences have the same length, up to
//! `max_batch_size` sequences, and runs them in one pass at the smallest
//! batch shape that holds them (padded with sequences of token 0). A
//! sequence's next-token logits depend only on its own ids and its pass's
//! shape (rows x length), bit for bit; between shapes they agree to float
//! rounding: the numerical contract of docs/serving.md. A request of another
//! length, or a generation, starts the next batch.
//!
//! A generation runs alone from its first token to its last through
//! `Gpt::generate` (seeded sampling with the KV cache, the code `kiln
//! generate` runs), so its text depends only on its prompt and parameters
//! (and never on the instance that ran it: the copies hold the same
//! weights). libtorch tensors are `Send` but not `Sync`, so each instance
//! owns its copy rather than sharing one; the bounded queue in front of them
//! answers 503 when full.
//!
//! A generation reports each token's text as it is produced
//! ([`GenerateEvent::Piece`]); [`TextStream`] turns tokens into pieces whose
//! concatenation is exactly the decoded text of the whole generation. It
//! stops early when its client goes away (the event channel closes) or its
//! time limit passes.

use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::batcher::{
    BatchSettings, Intake, Job, Passes, Queued, catch, refused, spawn_instances, take_batch,
};
use crate::error::{ErrorKind, ModelError, RequestError};
use crate::metrics::{Metrics, VersionLabels};
use crate::model::ServingNet;

/// How to sample a generation (Triton's generate parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate (fewer when the context fills).
    pub max_tokens: usize,
    /// 0 picks the most likely token; otherwise softmax(logits / temperature).
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    pub top_k: Option<usize>,
    /// Seed of the sampler: the same seed, prompt and parameters give the same text.
    pub seed: u64,
}

/// What a generation reports, in order: pieces, then `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// The text of one generated token (empty when the token ends inside a
    /// multi-byte character; the character comes with a later piece).
    Piece(String),
    /// Finished: the whole generated text (the concatenation of the pieces)
    /// and its number of tokens.
    Done {
        /// The whole generated text.
        text: String,
        /// Tokens generated.
        tokens: usize,
    },
    /// Failed, possibly after some pieces.
    Failed(RequestError),
}

/// A generation waiting for the compute thread.
pub struct GenerateJob {
    /// The prompt's token ids (checked: 1 to context ids, all in the vocabulary).
    pub prompt: Vec<i64>,
    /// How to sample.
    pub params: GenerateParams,
    /// Decodes each generated token into its piece of text.
    pub tokenizer: Arc<kiln_text::Tokenizer>,
    /// Generation stops, with a timeout error, once this passes.
    pub deadline: Instant,
    /// When it was queued, for the queue-time metric.
    pub enqueued: Instant,
    /// Where its pieces and its end go; closed when the client gave up,
    /// and then the generation stops.
    pub events: mpsc::UnboundedSender<GenerateEvent>,
}

/// Work for a language model's compute thread.
pub enum LmJob {
    /// Next-token logits after each of a request's sequences, all `len` ids
    /// long (`job.values`: rows x len ids, checked against the vocabulary).
    Logits {
        /// Ids per sequence; only requests of one length share a pass.
        len: usize,
        /// The sequences and where their logits go.
        job: Job<i64>,
    },
    /// A generation, run alone.
    Generate(GenerateJob),
}

impl LmJob {
    /// Whether the client already gave up on this job.
    fn abandoned(&self) -> bool {
        match self {
            LmJob::Logits { job, .. } => job.reply.is_closed(),
            LmJob::Generate(job) => job.events.is_closed(),
        }
    }
}

impl Queued for LmJob {
    fn rows(&self) -> usize {
        match self {
            LmJob::Logits { job, .. } => job.rows,
            LmJob::Generate(_) => 1,
        }
    }

    fn enqueued(&self) -> Instant {
        match self {
            LmJob::Logits { job, .. } => job.enqueued,
            LmJob::Generate(job) => job.enqueued,
        }
    }

    fn batches(&self) -> bool {
        matches!(self, LmJob::Logits { .. })
    }

    /// Logits of sequences of the first one's length.
    fn joins(&self, first: &LmJob) -> bool {
        matches!((self, first), (LmJob::Logits { len: a, .. }, LmJob::Logits { len: b, .. }) if a == b)
    }
}

/// The sending side of a language model's queue. Dropping every clone stops
/// the compute thread once the queue is drained.
#[derive(Clone)]
pub struct LmQueue {
    tx: SyncSender<LmJob>,
}

impl LmQueue {
    /// Starts a compute thread for each network of `nets` (a version's
    /// instances) with a queue of `settings.queue_capacity` jobs, batching
    /// `infer` requests as `settings` say.
    pub fn start(
        nets: Vec<ServingNet>,
        settings: BatchSettings,
        metrics: Metrics,
        labels: VersionLabels,
        name: String,
    ) -> std::io::Result<LmQueue> {
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.queue_capacity);
        let intake = Intake::new(rx);
        spawn_instances(nets, &name, move |net| {
            compute_loop(net, &intake, &settings, &metrics, &labels)
        })?;
        Ok(LmQueue { tx })
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: LmJob) -> Result<(), RequestError> {
        self.tx.try_send(job).map_err(refused)
    }
}

/// How `infer` passes of sequences of `len` ids run on `net`.
fn passes<'a>(net: &ServingNet, len: usize, settings: &'a BatchSettings) -> Passes<'a, i64> {
    Passes {
        width: len,
        pad: 0,
        classes: net.classes(),
        settings,
    }
}

fn compute_loop(
    net: ServingNet,
    intake: &Mutex<Intake<LmJob>>,
    settings: &BatchSettings,
    metrics: &Metrics,
    labels: &VersionLabels,
) {
    if settings.threads > 0 {
        tch::set_num_threads(settings.threads as i32);
    }
    while let Some(batch) = take_batch(intake, settings) {
        // A batch is logits requests of one length, or one generation.
        let mut logits = Vec::new();
        let mut len = 0;
        for job in batch.into_iter().filter(|job| !job.abandoned()) {
            match job {
                LmJob::Logits { len: l, job } => {
                    len = l;
                    logits.push(job);
                }
                LmJob::Generate(job) => run_generation(&net, job, metrics, labels),
            }
        }
        if !logits.is_empty() {
            passes(&net, len, settings).run_batch(logits, metrics, labels, |rows, ids| {
                Ok(net.next_token_logits(rows, len, ids)?)
            });
        }
    }
    tracing::debug!(model = %labels.model, version = %labels.version, "compute thread stopped");
}

/// Runs a generation (or refuses it when it waited past its deadline),
/// sending its events.
fn run_generation(net: &ServingNet, job: GenerateJob, metrics: &Metrics, labels: &VersionLabels) {
    let started = Instant::now();
    if started >= job.deadline {
        let _ = job.events.send(GenerateEvent::Failed(RequestError::new(
            ErrorKind::Timeout,
            "the generation waited in the queue past the request's time limit",
        )));
        return;
    }
    metrics.observe_queue(labels, started.saturating_duration_since(job.enqueued));
    let last = catch(|| generate(net, &job)).unwrap_or_else(|e| {
        tracing::error!(model = %labels.model, version = %labels.version, error = %format!("{e:#}"), "generation failed");
        GenerateEvent::Failed(RequestError::internal(format!("generation failed: {e:#}")))
    });
    metrics.observe_batch(labels, 1, started.elapsed());
    if let GenerateEvent::Done { tokens, .. } = &last {
        metrics.observe_generated(labels, *tokens);
    }
    let _ = job.events.send(last);
}

/// Runs one generation, sending a piece per token; returns the final event.
fn generate(net: &ServingNet, job: &GenerateJob) -> Result<GenerateEvent> {
    let gpt = net
        .gpt()
        .context("generation on a model that is not a language model")?;
    let p = job.params;
    let mut text = TextStream::new(&job.tokenizer);
    let mut failed: Option<RequestError> = None;
    let tokens = gpt.generate(
        &job.prompt,
        p.max_tokens,
        p.temperature,
        p.top_k,
        p.seed,
        |token| {
            let piece = match text.push(token) {
                Ok(piece) => piece,
                Err(e) => {
                    failed = Some(RequestError::internal(format!(
                        "decode generated token {token}: {e:#}"
                    )));
                    return false;
                }
            };
            if job.events.send(GenerateEvent::Piece(piece)).is_err() {
                // The client went away: stop spending compute on it.
                return false;
            }
            if Instant::now() >= job.deadline {
                failed = Some(RequestError::new(
                    ErrorKind::Timeout,
                    "the generation did not finish within the request's time limit",
                ));
                return false;
            }
            true
        },
    )?;
    if let Some(e) = failed {
        return Ok(GenerateEvent::Failed(e));
    }
    let (rest, whole) = text.finish()?;
    if !rest.is_empty() {
        let _ = job.events.send(GenerateEvent::Piece(rest));
    }
    Ok(GenerateEvent::Done {
        text: whole,
        tokens: tokens.len(),
    })
}

/// Turns generated tokens into text pieces as they come: each piece is the
/// text the token completes. A token that ends inside a multi-byte character
/// decodes to U+FFFD for now; that text is held back until a later token
/// completes the character (or the generation ends), so the pieces
/// concatenate to exactly the decoded text of all the tokens.
pub struct TextStream<'a> {
    tokenizer: &'a kiln_text::Tokenizer,
    ids: Vec<u32>,
    /// The text sent so far.
    sent: String,
}

impl<'a> TextStream<'a> {
    /// A stream with no tokens yet.
    pub fn new(tokenizer: &'a kiln_text::Tokenizer) -> TextStream<'a> {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            sent: String::new(),
        }
    }

    /// Adds a token; returns the text to send for it (possibly empty). A
    /// negative token, or the tokenizer failing to decode, is `Internal`:
    /// generation hands it the model's own ids.
    pub fn push(&mut self, token: i64) -> Result<String, ModelError> {
        let id = u32::try_from(token)
            .map_err(|e| ModelError::internal(format!("token {token} is not an id"), e))?;
        self.ids.push(id);
        let full = self.decode()?;
        let stable = full.trim_end_matches('\u{FFFD}');
        match stable.strip_prefix(self.sent.as_str()) {
            Some(new) => {
                let new = new.to_string();
                self.sent.push_str(&new);
                Ok(new)
            }
            // Decoding more tokens changed text already sent (a tokenizer
            // whose decoder looks ahead): wait for the end.
            None => Ok(String::new()),
        }
    }

    /// The text not sent yet and the whole text (errors as [`Self::push`]'s).
    pub fn finish(self) -> Result<(String, String), ModelError> {
        let full = self.decode()?;
        let rest = match full.strip_prefix(self.sent.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                tracing::warn!(
                    "the decoded text differs from the pieces streamed; the last piece carries the difference"
                );
                String::new()
            }
        };
        Ok((rest, full))
    }

    /// The text of every token so far.
    fn decode(&self) -> Result<String, ModelError> {
        self.tokenizer
            .decode(&self.ids)
            .map_err(|e| ModelError::Internal {
                reason: e.to_string(),
            })
    }
}

/// Runs a few passes so the first real request does not pay for libtorch's
/// lazy initialisation: logits at every batch shape for one token and for
/// the full context, and a short greedy generation (the KV cache path). A
/// failure is `Internal`: `warm up: ` and what failed.
pub fn warm_up(net: &ServingNet, settings: &BatchSettings) -> Result<(), ModelError> {
    warm_up_passes(net, settings).map_err(|e| ModelError::internal("warm up", e))
}

fn warm_up_passes(net: &ServingNet, settings: &BatchSettings) -> Result<()> {
    let gpt = net
        .gpt()
        .context("warm up a model that is not a language model")?;
    let context = gpt.config().seq_len;
    for len in [1, context] {
        passes(net, len, settings)
            .warm_up(|rows, ids| Ok(net.next_token_logits(rows, len, ids)?))?;
    }
    gpt.generate(&[0], 2.min(context), 0.0, None, 0, |_| true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hold_back_partial_characters_and_add_up_to_the_text() {
        let tokenizer = kiln_text::Tokenizer::byte_level();
        // "a", "é" (two bytes), "b", then half of "€" (three bytes).
        let text = "aéb€";
        let ids: Vec<i64> = tokenizer
            .encode(text)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ids.len(), 1 + 2 + 1 + 3);
        let mut stream = TextStream::new(&tokenizer);
        let pieces: Vec<String> = ids[..6].iter().map(|&t| stream.push(t).unwrap()).collect();
        assert_eq!(pieces, ["a", "", "é", "b", "", ""]);
        let (rest, whole) = stream.finish().unwrap();
        // The generation ended inside "€": the rest is what decoding says.
        assert_eq!(whole, format!("aéb{}", '\u{FFFD}'));
        assert_eq!(pieces.concat() + &rest, whole);

        let mut stream = TextStream::new(&tokenizer);
        let pieces: Vec<String> = ids.iter().map(|&t| stream.push(t).unwrap()).collect();
        assert_eq!(pieces.last().unwrap(), "€");
        let (rest, whole) = stream.finish().unwrap();
        assert_eq!((rest.as_str(), whole.as_str()), ("", text));
        assert!(TextStream::new(&tokenizer).push(-1).is_err());
    }
}
