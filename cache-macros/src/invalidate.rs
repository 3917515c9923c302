//! `#[invalidate_cache(...)]`, its by-name resolution, and `invalidate!`, `refresh!`,
//! `peek!`.
//!
//! All of them reach a cached function through its companions (see `cached/companions.rs`):
//! `path::__cache_key(args)` for a free function, `Type::__cache_key_method(args)` or
//! `receiver.__cache_key_method(args)` for a method. Calling a companion type-checks the
//! arguments against the cached function's parameters, and a target that is not cached
//! has no companion, which is a compile error.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, FnArg, Ident, ItemFn, LitStr, Pat, Path, ReturnType, Token, Type};

use crate::attr::Errors;

/// One target of `#[invalidate_cache(...)]`.
enum Target {
    /// `get_product`: the arguments are this function's parameters of the same names.
    ByName(Path),
    /// `get_product(id)`, `Self::get(self, id)`, `self.get(id)`: explicit arguments.
    Call(Expr),
    /// `dependency = format!("order:{id}")`.
    Dependency(Expr),
}

struct Targets(Vec<Target>);

impl Parse for Targets {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut targets = Vec::new();
        while !input.is_empty() {
            if input.peek(Ident) && input.peek2(Token![=]) && !input.peek2(Token![==]) {
                let key: Ident = input.parse()?;
                if key != "dependency" {
                    return Err(syn::Error::new(
                        key.span(),
                        format!("unknown option `{key}`; `#[invalidate_cache]` takes cached functions (`get_product`, `get_product(id)`) and `dependency = <expression>`"),
                    ));
                }
                input.parse::<Token![=]>()?;
                targets.push(Target::Dependency(input.parse()?));
            } else {
                let expr: Expr = input.parse()?;
                targets.push(match expr {
                    Expr::Path(p) if p.qself.is_none() => Target::ByName(p.path),
                    e @ (Expr::Call(_) | Expr::MethodCall(_)) => Target::Call(e),
                    other => {
                        return Err(syn::Error::new(
                            other.span(),
                            "expected a cached function (`get_product`), a call of one (`get_product(id)`), or `dependency = <expression>`",
                        ))
                    }
                });
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(Targets(targets))
    }
}

/// Whether a path names an associated function (`Self::get`, `Repo::get`) rather than
/// a free one (`get`, `catalog::get`): by the segment before the last, `Self` or a type
/// name (capitalised, as Rust names types).
fn is_associated(path: &Path) -> bool {
    let n = path.segments.len();
    n >= 2 && {
        let owner = path.segments[n - 2].ident.to_string();
        owner == "Self" || owner.starts_with(|c: char| c.is_ascii_uppercase())
    }
}

/// `path::to::f` → `path::to::f::__cache_<what>`, or for an associated function
/// `Type::f` → `Type::__cache_<what>_f`; generic arguments move to the companion.
fn companion_path(path: &Path, what: &str) -> TokenStream {
    let mut path = path.clone();
    let last = path
        .segments
        .pop()
        .expect("a path has a segment")
        .into_value();
    let generics = &last.arguments;
    let prefix = path.segments.iter().map(|s| s.to_token_stream());
    let leading = path.leading_colon;
    if is_associated(&syn::Path {
        leading_colon: None,
        segments: {
            let mut p = path.segments.clone();
            p.push(last.clone());
            p
        },
    }) {
        let name = format_ident!("__cache_{}_{}", what, last.ident, span = last.ident.span());
        quote!(#leading #(#prefix ::)* #name #generics)
    } else {
        let f = &last.ident;
        let name = format_ident!("__cache_{}", what, span = last.ident.span());
        quote!(#leading #(#prefix ::)* #f :: #name #generics)
    }
}

/// Rewrites a call of a cached function into a call of its companion `what`.
fn companion_call(call: &Expr, what: &str) -> syn::Result<TokenStream> {
    match call {
        Expr::Call(c) => {
            let Expr::Path(p) = &*c.func else {
                return Err(syn::Error::new(
                    c.func.span(),
                    "expected the name of a cached function, as in `get_product(42)`",
                ));
            };
            let func = companion_path(&p.path, what);
            let args = &c.args;
            Ok(quote_spanned!(c.span()=> #func(#args)))
        }
        Expr::MethodCall(m) => {
            let receiver = &m.receiver;
            let name = format_ident!("__cache_{}_{}", what, m.method, span = m.method.span());
            let turbofish = &m.turbofish;
            let args = &m.args;
            Ok(quote!(#receiver.#name #turbofish (#args)))
        }
        other => Err(syn::Error::new(
            other.span(),
            "expected a call of a cached function, as in `get_product(42)` or `repo.get_by_id(42)`",
        )),
    }
}

pub(crate) fn expand_attribute(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let attr_span = args.span();
    let targets: Targets = syn::parse2(args)?;
    let func: ItemFn = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            "`#[invalidate_cache]` can only be applied to functions and methods with a body",
        )
    })?;
    if targets.0.is_empty() {
        return Err(syn::Error::new(
            attr_span,
            "`#[invalidate_cache]` needs at least one target: a cached function (`#[invalidate_cache(get_product)]`), a call (`#[invalidate_cache(get_product(id))]`) or `dependency = <expression>`",
        ));
    }
    let mut errors = Errors::default();

    // This function's parameters, for by-name targets.
    let mut available = Vec::new();
    for input in &func.sig.inputs {
        if let FnArg::Typed(pt) = input {
            if let Pat::Ident(pi) = &*pt.pat {
                let is_ref = matches!(&*pt.ty, Type::Reference(_));
                available.push((pi.ident.clone(), is_ref));
            }
        }
    }

    let mut keys = Vec::new();
    let mut deps = Vec::new();
    for target in &targets.0 {
        match target {
            Target::ByName(path) if is_associated(path) => errors.add(
                path.span(),
                format!(
                    "`{}` is a method: name its arguments, as in `#[invalidate_cache({}(self, id))]`",
                    path.to_token_stream().to_string().replace(' ', ""),
                    path.to_token_stream().to_string().replace(' ', "")
                ),
            ),
            Target::ByName(path) => {
                let names = available.iter().map(|(id, _)| id);
                let refs = available.iter().map(|(_, r)| r);
                keys.push(quote_spanned! {path.span()=>
                    #path! { path = #path, available = [#((#names, #refs)),*] }
                });
            }
            Target::Call(call) => match companion_call(call, "key") {
                Ok(c) => keys.push(c),
                Err(e) => errors.push(e),
            },
            Target::Dependency(expr) => deps.push(quote_spanned! {expr.span()=>
                ::cache_runtime::Dependency::from(#expr)
            }),
        }
    }
    errors.finish()?;

    let sig = &func.sig;
    let attrs = &func.attrs;
    let vis = &func.vis;
    let block = &func.block;
    let stmts = &block.stmts;
    let ret_ty = match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => ty.to_token_stream(),
    };
    let is_result = match &sig.output {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    };
    let succeeded = if is_result {
        quote!(__cache_result.is_ok())
    } else {
        quote!(true)
    };
    let prepare = quote! {
        // Keys are computed from the arguments before the body consumes them.
        #[allow(clippy::needless_borrow, clippy::borrow_deref_ref)]
        let __cache_keys: ::std::vec::Vec<::cache_runtime::__private::CallKey> = ::std::vec![#(#keys),*];
        let __cache_deps: ::std::vec::Vec<::cache_runtime::Dependency> = ::std::vec![#(#deps),*];
    };
    let body = if sig.asyncness.is_some() {
        quote! {
            #prepare
            let __cache_result: #ret_ty = async move {
                #[allow(unreachable_code, clippy::diverging_sub_expression, clippy::let_unit_value)]
                if false {
                    let __cache_unreachable: #ret_ty = loop {};
                    return __cache_unreachable;
                }
                #(#stmts)*
            }
            .await;
            if #succeeded {
                ::cache_runtime::__private::invalidate_after(__cache_keys, __cache_deps).await;
            }
            __cache_result
        }
    } else {
        quote! {
            #prepare
            #[allow(clippy::redundant_closure_call)]
            let __cache_result: #ret_ty = (move || -> #ret_ty #block)();
            if #succeeded {
                ::cache_runtime::__private::invalidate_after_sync(__cache_keys, __cache_deps);
            }
            __cache_result
        }
    };
    Ok(quote! {
        #(#attrs)*
        #vis #sig {
            #body
        }
    })
}

/// Input of the by-name resolution: the target's key parameters (from its companion
/// macro) and this function's parameters (from `#[invalidate_cache]`).
struct ByName {
    target: LitStr,
    key_params: Vec<LitStr>,
    path: Path,
    available: Vec<(Ident, bool)>,
}

impl Parse for ByName {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        fn field<T: Parse>(input: ParseStream, name: &str) -> syn::Result<T> {
            let key: Ident = input.parse()?;
            if key != name {
                return Err(syn::Error::new(key.span(), format!("expected `{name}`")));
            }
            input.parse::<Token![=]>()?;
            let v = input.parse()?;
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
            Ok(v)
        }
        let target = field::<LitStr>(input, "target")?;
        let content;
        let key: Ident = input.parse()?;
        if key != "key_params" {
            return Err(syn::Error::new(key.span(), "expected `key_params`"));
        }
        input.parse::<Token![=]>()?;
        syn::bracketed!(content in input);
        let key_params = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?
            .into_iter()
            .collect();
        input.parse::<Token![,]>()?;
        let path = field::<Path>(input, "path")?;
        let key: Ident = input.parse()?;
        if key != "available" {
            return Err(syn::Error::new(key.span(), "expected `available`"));
        }
        input.parse::<Token![=]>()?;
        let content;
        syn::bracketed!(content in input);
        let mut available = Vec::new();
        while !content.is_empty() {
            let pair;
            syn::parenthesized!(pair in content);
            let id: Ident = pair.parse()?;
            pair.parse::<Token![,]>()?;
            let is_ref: syn::LitBool = pair.parse()?;
            available.push((id, is_ref.value));
            if !content.is_empty() {
                content.parse::<Token![,]>()?;
            }
        }
        Ok(ByName {
            target,
            key_params,
            path,
            available,
        })
    }
}

/// Resolves `#[invalidate_cache(f)]`: each key parameter of `f` is taken from this
/// function's parameter of the same name.
pub(crate) fn expand_by_name(input: TokenStream) -> syn::Result<TokenStream> {
    let b: ByName = syn::parse2(input)?;
    let mut errors = Errors::default();
    let mut args = Vec::new();
    for name in &b.key_params {
        let name = name.value();
        match b.available.iter().find(|(id, _)| *id == name) {
            Some((id, true)) => args.push(quote_spanned!(id.span()=> #id)),
            Some((id, false)) => args.push(quote_spanned!(id.span()=> &#id)),
            None => errors.add(
                b.path.span(),
                format!(
                    "`{}` needs the parameter `{name}` for its key, and this function has no parameter named `{name}`; add it, or give the arguments: `#[invalidate_cache({}(...))]`",
                    b.target.value(),
                    b.target.value()
                ),
            ),
        }
    }
    errors.finish()?;
    let func = companion_path(&b.path, "key_named");
    Ok(quote!(#func(#(#args),*)))
}

/// `invalidate!(f(args))`, `refresh!(f(args))`, `peek!(f(args))`.
pub(crate) fn expand_imperative(input: TokenStream, what: &str) -> syn::Result<TokenStream> {
    let call: Expr = syn::parse2(input.clone()).map_err(|_| {
        syn::Error::new(
            Span::call_site(),
            format!("`{what}!` takes a call of a cached function, as in `{what}!(get_product(42))` or `{what}!(repo.get_by_id(42))`"),
        )
    })?;
    Ok(match what {
        "invalidate" => {
            let key = companion_call(&call, "key")?;
            quote!(::cache_runtime::__private::invalidate_calls([#key]))
        }
        "refresh" => companion_call(&call, "refresh")?,
        _ => {
            // looked up when awaited, so that `service.scope(peek!(..))` reads that
            // service
            let peek = companion_call(&call, "peek")?;
            quote!(async { #peek })
        }
    })
}
