//! Procedural macros of `cache-runtime`. Use them through `cache_runtime`, which
//! re-exports them and documents them: the generated code refers to
//! `::cache_runtime::__private`.

#![forbid(unsafe_code)]

mod attr;
mod cached;
mod derive;
mod invalidate;

use proc_macro::TokenStream;

/// Caches a function's result. See `cache_runtime::cached`.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    match cached::expand(args.into(), item.clone().into()) {
        Ok(ts) => ts.into(),
        Err(e) => {
            // Keep the function so that one error does not cascade into "not found".
            let mut out: TokenStream = e.to_compile_error().into();
            out.extend(item);
            out
        }
    }
}

/// Derives `CacheKey`. See `cache_runtime::CacheKey`.
#[proc_macro_derive(CacheKey)]
pub fn derive_cache_key(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::expand(input)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Invalidates cached entries after the function succeeds. See
/// `cache_runtime::invalidate_cache`.
#[proc_macro_attribute]
pub fn invalidate_cache(args: TokenStream, item: TokenStream) -> TokenStream {
    match invalidate::expand_attribute(args.into(), item.clone().into()) {
        Ok(ts) => ts.into(),
        Err(e) => {
            let mut out: TokenStream = e.to_compile_error().into();
            out.extend(item);
            out
        }
    }
}

/// Resolves `#[invalidate_cache(f)]` by parameter name. Called by the companion macro
/// `#[cached]` generates; not for direct use.
#[doc(hidden)]
#[proc_macro]
pub fn __by_name(input: TokenStream) -> TokenStream {
    invalidate::expand_by_name(input.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Removes a call's entry everywhere. See `cache_runtime::invalidate!`.
#[proc_macro]
pub fn invalidate(input: TokenStream) -> TokenStream {
    imperative(input, "invalidate")
}

/// Runs a call's body and stores the result. See `cache_runtime::refresh!`.
#[proc_macro]
pub fn refresh(input: TokenStream) -> TokenStream {
    imperative(input, "refresh")
}

/// Reads a call's entry without running it. See `cache_runtime::peek!`.
#[proc_macro]
pub fn peek(input: TokenStream) -> TokenStream {
    imperative(input, "peek")
}

fn imperative(input: TokenStream, what: &str) -> TokenStream {
    invalidate::expand_imperative(input.into(), what)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}
