//! Gradient-ready hooks: libtorch's post-accumulate-grad hooks, which tch
//! does not expose, installed through a small C++ shim
//! (`trainer/csrc/grad_hooks.cpp`, compiled by `build.rs` against the same
//! libtorch). After backward has accumulated a parameter's gradient, the hook
//! calls back with the parameter's index, on the thread running backward.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use tch::Tensor;

use crate::error::{Error, Result};

type ReadyFn = extern "C" fn(context: *mut c_void, index: i64);

unsafe extern "C" {
    fn kiln_set_grad_ready_hook(
        tensor: *mut c_void,
        f: ReadyFn,
        context: *mut c_void,
        index: i64,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn kiln_clear_grad_ready_hook(tensor: *mut c_void, error: *mut c_char, error_len: usize)
    -> i32;
}

type Callback = Box<dyn Fn(usize) + Send + Sync>;

/// Hooks on a set of parameters calling one callback with the parameter's
/// index; removed when dropped.
pub(super) struct GradReadyHooks {
    params: Vec<Tensor>,
    /// The hooks hold a raw pointer to this box: it lives (and does not
    /// move) until the hooks are removed in `drop`.
    callback: Box<Callback>,
}

extern "C" fn on_ready(context: *mut c_void, index: i64) {
    // SAFETY: `context` is the `Box<Callback>` of a live `GradReadyHooks`
    // (hooks are removed before it is dropped).
    let callback = unsafe { &*(context as *const Callback) };
    // A panic must not unwind into libtorch's C++ frames.
    if catch_unwind(AssertUnwindSafe(|| callback(index as usize))).is_err() {
        tracing::error!(index, "gradient-ready callback panicked");
    }
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl GradReadyHooks {
    /// Installs a hook on every parameter (replacing earlier ones) that calls
    /// `callback(i)` once parameter `i`'s gradient has been accumulated.
    pub(super) fn install(
        params: &[Tensor],
        callback: impl Fn(usize) + Send + Sync + 'static,
    ) -> Result<Self> {
        let mut hooks = GradReadyHooks {
            params: Vec::with_capacity(params.len()),
            callback: Box::new(Box::new(callback)),
        };
        let context = &*hooks.callback as *const Callback as *mut c_void;
        for (i, p) in params.iter().enumerate() {
            let mut t = p.shallow_clone();
            let mut error = [0u8; 512];
            // SAFETY: `t` is a live tensor (tch's C_tensor is an at::Tensor*);
            // `context` outlives the hook (see the field's comment); the error
            // buffer's length is passed.
            let rc = unsafe {
                kiln_set_grad_ready_hook(
                    t.as_mut_ptr() as *mut c_void,
                    on_ready,
                    context,
                    i as i64,
                    error.as_mut_ptr() as *mut c_char,
                    error.len(),
                )
            };
            if rc != 0 {
                return Err(Error::failed(format!(
                    "install a gradient hook on parameter {i}: {}",
                    message(&error)
                )));
            }
            // Pushed only once installed, so `drop` removes exactly these.
            hooks.params.push(t);
        }
        Ok(hooks)
    }
}

impl Drop for GradReadyHooks {
    fn drop(&mut self) {
        for t in &mut self.params {
            let mut error = [0u8; 512];
            // SAFETY: a live tensor and a buffer of the length passed.
            let rc = unsafe {
                kiln_clear_grad_ready_hook(
                    t.as_mut_ptr() as *mut c_void,
                    error.as_mut_ptr() as *mut c_char,
                    error.len(),
                )
            };
            if rc != 0 {
                tracing::error!("remove a gradient hook: {}", message(&error));
            }
        }
    }
}

/// The order in which backward makes the parameters' gradients ready, seen
/// on one backward pass run by `backward`: parameters that got no gradient
/// come last, in index order. Buckets are laid out in this order so that
/// the first bucket is complete first (DDP lays its buckets out the same way).
pub(super) fn ready_order(
    params: &[Tensor],
    backward: impl FnOnce() -> Result<()>,
) -> Result<Vec<usize>> {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let hooks = {
        let seen = seen.clone();
        GradReadyHooks::install(params, move |i| {
            seen.lock().expect("ready order lock").push(i);
        })?
    };
    let result = backward();
    drop(hooks);
    result?;
    let mut order: Vec<usize> = Vec::with_capacity(params.len());
    let mut placed = vec![false; params.len()];
    for i in seen.lock().expect("ready order lock").iter().copied() {
        if !placed[i] {
            placed[i] = true;
            order.push(i);
        }
    }
    order.extend((0..params.len()).filter(|&i| !placed[i]));
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn hooks_fire_after_accumulation_in_backward_order_and_are_removed() {
        let mut a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let unused = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = vec![a.shallow_clone(), b.shallow_clone(), unused.shallow_clone()];
        // b is used last in forward, so backward reaches it first.
        let order = ready_order(&params, || {
            let h = (&a * 2.0).sum(Kind::Float);
            (&h * &b).sum(Kind::Float).backward();
            Ok(())
        })
        .unwrap();
        assert_eq!(order, [1, 0, 2]);
        // The gradient is in place when the hook runs.
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let hooks = {
            // Tensors are Send, not Sync: the callback reads through a lock.
            let (seen, a) = (seen.clone(), Mutex::new(a.shallow_clone()));
            GradReadyHooks::install(&params[..1], move |i| {
                let grad = a.lock().unwrap().grad();
                seen.lock()
                    .unwrap()
                    .push((i, grad.sum(Kind::Float).double_value(&[])));
            })
            .unwrap()
        };
        a.zero_grad();
        (&a * 5.0).sum(Kind::Float).backward();
        assert_eq!(*seen.lock().unwrap(), [(0, 15.0)]);
        drop(hooks);
        (&a * 5.0).sum(Kind::Float).backward();
        assert_eq!(seen.lock().unwrap().len(), 1, "removed hooks do not fire");
    }
}
