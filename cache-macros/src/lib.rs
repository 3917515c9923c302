//! Procedural macros of `cache-runtime`. Use them through `cache_runtime`, which
//! re-exports them and documents them: the generated code refers to
//! `::cache_runtime::__private`.

mod attr;
mod cached;
mod derive;

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
