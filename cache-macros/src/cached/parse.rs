//! `#[cached]`'s input, checked: the options, the parameters, what the return type
//! stores, which companions the function gets. Every misuse is reported here, with
//! what to change.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::attr::{Errors, Options};

/// A function `#[cached]` can wrap, with what the generators need to know of it.
pub(super) struct CachedFn {
    pub(super) opts: Options,
    pub(super) func: ItemFn,
    pub(super) params: Vec<Param>,
    pub(super) kind: Kind,
    pub(super) ret_ty: Type,
    pub(super) is_async: bool,
    pub(super) has_receiver: bool,
    /// Its body can go on in the background (soft timeout, eager refresh): an `async
    /// fn` without generics or receiver whose parameters are owned, which names a
    /// profile or sets `soft_timeout` or `eager_refresh` (the future must then be
    /// `Send`).
    pub(super) background: bool,
    /// Keyed by the receiver's type (a method without a `name`).
    pub(super) method: bool,
    pub(super) companions: Companions,
}

/// How the return type maps to what is stored (see `cache_runtime::__private::ReturnKind`).
pub(super) enum Kind {
    Plain,
    ResultOk,
    Optional,
}

pub(super) struct Param {
    /// `None` for the receiver.
    pub(super) ident: Option<Ident>,
    pub(super) ty: Option<Type>,
    pub(super) span: Span,
    pub(super) is_ref: bool,
    pub(super) is_mut_ref: bool,
    pub(super) skipped: bool,
}

/// Parses and checks the attribute's options and the function.
pub(super) fn parse(args: TokenStream, item: TokenStream) -> syn::Result<CachedFn> {
    let opts: Options = syn::parse2(args)?;
    let func = parse_function(item)?;
    let mut errors = Errors::default();

    for attr in &func.attrs {
        if attr
            .path()
            .segments
            .last()
            .is_some_and(|s| s.ident == "cached")
        {
            errors.add(
                attr.path().span(),
                "`#[cached]` is applied twice to this function; remove one",
            );
        }
    }

    let sig = &func.sig;
    let fn_name = &sig.ident;

    // Return type.
    let ret_ty: Option<&Type> = match &sig.output {
        ReturnType::Default => {
            errors.add(
                sig.paren_token.span.close(),
                format!("`{fn_name}` returns `()`, so there is nothing to cache; return the value to cache, or remove `#[cached]`"),
            );
            None
        }
        ReturnType::Type(_, ty) => {
            check_return_type(ty, &mut errors);
            Some(ty)
        }
    };

    // Parameters.
    let mut params = Vec::new();
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(r) => params.push(Param {
                ident: None,
                ty: None,
                span: r.self_token.span,
                is_ref: r.reference.is_some(),
                is_mut_ref: r.reference.is_some() && r.mutability.is_some(),
                skipped: false,
            }),
            FnArg::Typed(pt) => {
                let ident = match &*pt.pat {
                    Pat::Ident(pi) if pi.subpat.is_none() && pi.by_ref.is_none() => {
                        pi.ident.clone()
                    }
                    other => {
                        errors.add(other.span(), "a cached function's parameters must be plain names (they become part of the key); bind the pattern inside the body instead");
                        continue;
                    }
                };
                let (is_ref, is_mut_ref) = match &*pt.ty {
                    Type::Reference(r) => (true, r.mutability.is_some()),
                    _ => (false, false),
                };
                params.push(Param {
                    ident: Some(ident),
                    ty: Some((*pt.ty).clone()),
                    span: pt.ty.span(),
                    is_ref,
                    is_mut_ref,
                    skipped: false,
                });
            }
        }
    }
    for s in &opts.skip {
        let found = params.iter_mut().find(|p| match &p.ident {
            None => s == "self",
            Some(i) => i == s,
        });
        match found {
            Some(p) => p.skipped = true,
            None => errors.add(
                s.span(),
                format!("`skip({s})`: `{fn_name}` has no parameter named `{s}`"),
            ),
        }
    }
    for p in &params {
        if p.is_mut_ref && !p.skipped {
            let name = p
                .ident
                .as_ref()
                .map_or("self".to_string(), Ident::to_string);
            errors.add(
                p.span,
                format!("`{name}` is a `&mut` parameter, which cannot be part of a cache key (a hit would not run the body that changes it); add `skip({name})` to `#[cached(...)]`"),
            );
        }
    }

    let kind = ret_ty.map_or(Kind::Plain, return_kind);
    if let Some((_, span)) = opts.cache_none {
        if !matches!(kind, Kind::Optional) {
            errors.add(
                span,
                "`cache_none` applies to functions returning `Option<T>`; remove it",
            );
        }
    }
    let background = why_not_background(sig, &params);
    if let Some(why) = &background {
        let background_options = [
            ("soft_timeout", opts.soft_timeout.map(|(_, s)| s)),
            ("eager_refresh", opts.eager_refresh.map(|(_, s)| s)),
        ];
        for (option, span) in background_options {
            if let Some(span) = span {
                errors.add(span, format!("`{option}` runs the body in the background, which `{fn_name}`'s cannot: {why}"));
            }
        }
    }
    errors.finish()?;
    let ret_ty = ret_ty.expect("checked above").clone();
    let has_receiver = params.iter().any(|p| p.ident.is_none());
    let companions = if !has_receiver && !mentions_self_type(sig.to_token_stream()) {
        Companions::Free
    } else if !matches!(func.vis, syn::Visibility::Inherited) {
        Companions::Associated
    } else {
        Companions::None
    };
    // Only where it may be used: the body's future must then be `Send`, which a
    // recursive function's cannot be shown to be.
    let wanted =
        opts.profile.is_some() || opts.soft_timeout.is_some() || opts.eager_refresh.is_some();
    Ok(CachedFn {
        background: background.is_none() && wanted,
        method: has_receiver && opts.name.is_none(),
        is_async: sig.asyncness.is_some(),
        opts,
        params,
        kind,
        ret_ty,
        has_receiver,
        companions,
        func,
    })
}

/// Why the body of the function cannot go on in the background, where a soft
/// timeout or an eager refresh runs it (a task of its own, which outlives the call):
/// it must be an `async fn` without generics or receiver, whose parameters own what
/// they hold. `None` if it can.
fn why_not_background(sig: &syn::Signature, params: &[Param]) -> Option<String> {
    if sig.asyncness.is_none() {
        return Some("it must be an `async fn`".into());
    }
    if !sig.generics.params.is_empty() {
        return Some("it must not be generic".into());
    }
    if params.iter().any(|p| p.ident.is_none()) {
        return Some(
            "it must not take `self` (make it a function taking what it needs, owned)".into(),
        );
    }
    params.iter().find(|p| p.ty.as_ref().is_some_and(borrows)).map(|p| {
        let name = p.ident.as_ref().map_or_else(String::new, Ident::to_string);
        format!("its parameters must be owned, and `{name}` borrows; take `String` rather than `&str`, `Arc<Db>` or a pool handle rather than `&Db`")
    })
}

/// Whether a type borrows: a reference, a lifetime or `impl Trait` anywhere in it.
fn borrows(ty: &Type) -> bool {
    fn walk(tokens: TokenStream) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Punct(p) => p.as_char() == '&' || p.as_char() == '\'',
            proc_macro2::TokenTree::Ident(i) => i == "impl",
            proc_macro2::TokenTree::Group(g) => walk(g.stream()),
            proc_macro2::TokenTree::Literal(_) => false,
        })
    }
    walk(ty.to_token_stream())
}

/// Which companion items a cached function gets. The attribute sees the function
/// alone, not whether it sits in a module, an inherent `impl` or a trait `impl`:
/// - a function without `self` whose signature does not mention `Self` is taken for a
///   free function: a struct of the same name (type namespace) carries the companion
///   functions, and a macro of the same name (macro namespace) resolves invalidation by
///   parameter name, so importing the function imports both;
/// - a method declared with a visibility (`pub`, `pub(crate)`...) is in an inherent
///   `impl` (trait `impl`s allow none): its companions are associated functions;
/// - any other method (a trait `impl`'s, or a private one) gets none, since extra items
///   in a trait `impl` do not compile.
pub(super) enum Companions {
    Free,
    Associated,
    None,
}

fn mentions_self_type(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|t| match t {
        proc_macro2::TokenTree::Ident(i) => i == "Self",
        proc_macro2::TokenTree::Group(g) => mentions_self_type(g.stream()),
        _ => false,
    })
}

/// Parses the item, or explains what `#[cached]` can be applied to.
fn parse_function(item: TokenStream) -> syn::Result<ItemFn> {
    if let Ok(f) = syn::parse2::<ItemFn>(item.clone()) {
        return Ok(f);
    }
    if let Ok(t) = syn::parse2::<syn::TraitItemFn>(item.clone()) {
        if t.default.is_none() {
            return Err(syn::Error::new(
                t.sig.ident.span(),
                "`#[cached]` needs a function body: put it on the method in the `impl` block, not on the trait's declaration",
            ));
        }
    }
    let span = match syn::parse2::<syn::Item>(item) {
        Ok(item) => item_keyword_span(&item),
        Err(_) => Span::call_site(),
    };
    Err(syn::Error::new(
        span,
        "`#[cached]` can only be applied to functions and methods (`fn` or `async fn` with a body)",
    ))
}

fn item_keyword_span(item: &syn::Item) -> Span {
    use syn::Item::*;
    match item {
        Struct(s) => s.struct_token.span,
        Enum(e) => e.enum_token.span,
        Const(c) => c.const_token.span,
        Static(s) => s.static_token.span,
        Impl(i) => i.impl_token.span,
        Mod(m) => m.mod_token.span,
        Trait(t) => t.trait_token.span,
        Type(t) => t.type_token.span,
        Use(u) => u.use_token.span,
        Union(u) => u.union_token.span,
        other => other.span(),
    }
}

fn check_return_type(ty: &Type, errors: &mut Errors) {
    match ty {
        Type::Tuple(t) if t.elems.is_empty() => errors.add(
            ty.span(),
            "the function returns `()`, so there is nothing to cache; return the value to cache, or remove `#[cached]`",
        ),
        Type::Reference(_) => errors.add(
            ty.span(),
            "a cached function cannot return a reference: the cache stores the value and hands out clones; return an owned type (`String` rather than `&str`, `Vec<T>` rather than `&[T]`), or an `Arc<T>`",
        ),
        Type::ImplTrait(_) => errors.add(
            ty.span(),
            "a cached function cannot return `impl Trait`: the cache must name the type it stores; return the concrete type",
        ),
        Type::Paren(p) => check_return_type(&p.elem, errors),
        _ => {}
    }
}

fn last_segment_args<'a>(ty: &'a Type, name: &str) -> Option<Vec<&'a Type>> {
    let Type::Path(p) = ty else { return None };
    if p.qself.is_some() {
        return None;
    }
    let seg = p.path.segments.last()?;
    if seg.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    Some(
        args.args
            .iter()
            .filter_map(|a| match a {
                GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
    )
}

/// Decided by the return type's last path segment: `Result<..>` and `Option<..>`.
fn return_kind(ty: &Type) -> Kind {
    if last_segment_args(ty, "Result").is_some_and(|a| !a.is_empty()) {
        Kind::ResultOk
    } else if last_segment_args(ty, "Option").is_some_and(|a| a.len() == 1) {
        Kind::Optional
    } else {
        Kind::Plain
    }
}

pub(super) fn stored_type(ty: &Type, kind: &Kind) -> TokenStream {
    match kind {
        Kind::ResultOk => last_segment_args(ty, "Result")
            .and_then(|a| a.first().copied())
            .map_or_else(|| ty.to_token_stream(), ToTokens::to_token_stream),
        _ => ty.to_token_stream(),
    }
}
