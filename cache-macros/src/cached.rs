//! `#[cached]`: checks the function and generates its wrapper.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::Token;
use syn::{
    FnArg, GenericArgument, GenericParam, Ident, ItemFn, Pat, PathArguments, ReturnType, Type,
};

use crate::attr::{Errors, Expiry, Options};

/// How the return type maps to what is stored (see `cache_runtime::__private::ReturnKind`).
enum Kind {
    Plain,
    ResultOk,
    Optional,
}

struct Param {
    /// `None` for the receiver.
    ident: Option<Ident>,
    ty: Option<Type>,
    span: Span,
    is_ref: bool,
    is_mut_ref: bool,
    skipped: bool,
}

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
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
    errors.finish()?;
    let ret_ty = ret_ty.expect("checked above");

    // Descriptor.
    let is_async = sig.asyncness.is_some();
    let has_receiver = params.iter().any(|p| p.ident.is_none());
    let method = has_receiver && opts.name.is_none();
    let name_expr = match &opts.name {
        Some(lit) => quote!(#lit),
        None if method => {
            let f = fn_name.to_string();
            quote!(#f)
        }
        None => {
            let f = fn_name.to_string();
            quote!(::core::concat!(::core::module_path!(), "::", #f))
        }
    };
    let version = opts.version.unwrap_or(1);
    let profile = opts
        .profile
        .as_ref()
        .map_or_else(|| "default".to_string(), |p| p.value());
    let expiration = match &opts.expiry {
        None => quote!(::core::option::Option::None),
        Some((Expiry::Ttl(n), _)) => quote!(::core::option::Option::Some(
            ::cache_runtime::__private::Expiration::Absolute(::cache_runtime::__private::Duration::from_nanos(#n))
        )),
        Some((Expiry::Sliding(n), _)) => quote!(::core::option::Option::Some(
            ::cache_runtime::__private::Expiration::Sliding(::cache_runtime::__private::Duration::from_nanos(#n))
        )),
    };
    let cache_none = opts.cache_none.is_none_or(|(v, _)| v);

    // Key.
    let self_type = if method {
        quote!(::core::option::Option::Some(
            ::cache_runtime::__private::type_name::<Self>()
        ))
    } else {
        quote!(::core::option::Option::None)
    };
    let mut type_args = Vec::new();
    for g in &sig.generics.params {
        match g {
            GenericParam::Type(t) => {
                let id = &t.ident;
                type_args
                    .push(quote!(__w.type_arg(::cache_runtime::__private::type_name::<#id>());));
            }
            GenericParam::Const(c) => {
                let id = &c.ident;
                type_args.push(quote!(__w.type_arg(&::std::format!("{}", #id));));
            }
            GenericParam::Lifetime(_) => {}
        }
    }
    // `impl Trait` parameters are anonymous generics: their type is part of the key.
    let mut impl_trait_args = Vec::new();
    for p in &params {
        if let (Some(Type::ImplTrait(_)), Some(id)) = (&p.ty, &p.ident) {
            impl_trait_args.push(id.clone());
        }
    }
    let writes = key_writes(
        &params,
        Receiver::AsDeclared,
        &type_args,
        &impl_trait_args,
        false,
    );

    // Value checks, reported at the return type.
    let stored_ty = stored_type(ret_ty, &kind);
    let ret_span = ret_ty.span();
    let shared = is_async && opts.local.is_none();
    // `shared` values may go to a remote tier: the value must be serializable.
    let ops = if shared {
        quote_spanned!(ret_span=> ::cache_runtime::__private::shared_ops::<#stored_ty>())
    } else {
        quote_spanned!(ret_span=> ::cache_runtime::__private::value_ops::<#stored_ty>())
    };
    let kind_path = match kind {
        Kind::Plain => quote!(::cache_runtime::__private::Plain),
        Kind::ResultOk => quote!(::cache_runtime::__private::ResultOk),
        Kind::Optional => quote!(::cache_runtime::__private::Optional),
    };

    // Where the descriptor lives, and which companions exist (see `Companions`).
    let mentions_self = mentions_self_type(sig.to_token_stream());
    let companions = if !has_receiver && !mentions_self {
        Companions::Free
    } else if !matches!(func.vis, syn::Visibility::Inherited) {
        Companions::Associated
    } else {
        Companions::None
    };
    let descriptor_fn = format_ident!("__cache_descriptor_{}", fn_name);
    let desc_expr = match companions {
        Companions::Free => quote!(#fn_name::__cache_descriptor()),
        Companions::Associated => quote!(Self::#descriptor_fn()),
        Companions::None => quote!(&__CACHE_DESCRIPTOR),
    };
    let descriptor_static = quote! {
        static __CACHE_DESCRIPTOR: ::cache_runtime::__private::Descriptor = ::cache_runtime::__private::Descriptor {
            key_name: #name_expr,
            method: #method,
            version: #version,
            profile: #profile,
            expiration: #expiration,
            cache_none: #cache_none,
            runtime: ::cache_runtime::__private::DescriptorRuntime::new(),
        };
    };

    let block = &func.block;
    let stmts = &block.stmts;
    let run = if is_async {
        // The miss path is boxed: it holds the body's future and the flight state, and
        // would otherwise make every call's future (hits included) as large as both.
        quote! {
            ::cache_runtime::__private::Box::pin(::cache_runtime::__private::run_async::<#kind_path, _, _>(
                __cache_path,
                #desc_expr,
                __cache_ops,
                async move {
                    // Tells type inference what the block returns, so `?` works inside it.
                    #[allow(unreachable_code, clippy::diverging_sub_expression, clippy::let_unit_value)]
                    if false {
                        let __cache_unreachable: #ret_ty = loop {};
                        return __cache_unreachable;
                    }
                    #(#stmts)*
                },
            )).await
        }
    } else {
        quote! {
            ::cache_runtime::__private::run_sync::<#kind_path, _, _>(
                __cache_path,
                #desc_expr,
                __cache_ops,
                move || -> #ret_ty #block,
            )
        }
    };
    let turbofish = {
        let args: Vec<TokenStream> = sig
            .generics
            .params
            .iter()
            .filter_map(|g| match g {
                GenericParam::Type(t) => Some(t.ident.to_token_stream()),
                GenericParam::Const(c) => Some(c.ident.to_token_stream()),
                GenericParam::Lifetime(_) => None,
            })
            .collect();
        if args.is_empty() {
            quote!()
        } else {
            quote!(::<#(#args),*>)
        }
    };
    // With companions, the key is written by one companion function that the wrapper
    // and the other companions call, so a parameter without `CacheKey` is reported once.
    let write_fn = match companions {
        Companions::Free => Some(quote!(#fn_name::__cache_write #turbofish)),
        Companions::Associated => {
            let f = format_ident!("__cache_write_{}", fn_name);
            Some(quote!(Self::#f #turbofish))
        }
        Companions::None => None,
    };
    let write_call = |receiver_is_ref: bool, params_are_refs: bool| -> TokenStream {
        let write_fn = write_fn.as_ref().expect("companions exist");
        let args = params
            .iter()
            .filter(|p| !p.skipped)
            .map(|p| match &p.ident {
                None if receiver_is_ref => quote!(self),
                None => quote!(&self),
                Some(id) if p.is_ref || params_are_refs => quote!(#id),
                Some(id) => quote!(&#id),
            });
        quote!(#write_fn(#(#args,)* __w);)
    };
    let wrapper_writes = match companions {
        Companions::None => writes.clone(),
        _ => write_call(params.iter().any(|p| p.ident.is_none() && p.is_ref), false),
    };
    let call = quote! {
        let __cache_ops = #ops;
        #[allow(clippy::needless_borrow, clippy::borrow_deref_ref)]
        // A hit returns here, before anything of the miss path exists: the lookup's
        // result is a temporary of this statement, not part of the future's state.
        let __cache_path = match ::cache_runtime::__private::lookup::<#kind_path, _>(
            #desc_expr,
            #self_type,
            __cache_ops,
            |__w: &mut ::cache_runtime::__private::KeyWriter| { #wrapper_writes },
        ) {
            ::cache_runtime::__private::Lookup::Hit(__cache_value) => return __cache_value,
            ::cache_runtime::__private::Lookup::Run(__cache_path) => __cache_path,
        };
        #run
    };

    let attrs = &func.attrs;
    let vis = &func.vis;
    let local_descriptor =
        matches!(companions, Companions::None).then(|| descriptor_static.clone());
    let wrapper = quote! {
        #(#attrs)*
        #vis #sig {
            #local_descriptor
            #call
        }
    };

    // Companions: what invalidation, `peek!` and `refresh!` call, type-checked against
    // the function's parameters.
    let (impl_generics, _, where_clause) = sig.generics.split_for_impl();
    let same_params = companion_params(&sig.inputs, false);
    let ref_receiver_params = companion_params(&sig.inputs, true);
    let call_args: Vec<&Ident> = params.iter().filter_map(|p| p.ident.as_ref()).collect();
    let ref_writes = (!matches!(companions, Companions::None)).then(|| write_call(true, false));
    let write_params: Vec<TokenStream> = params
        .iter()
        .filter(|p| !p.skipped)
        .map(|p| match (&p.ident, &p.ty) {
            (None, _) => quote!(&self),
            (Some(id), Some(ty)) => match ty {
                _ if p.is_ref => quote!(#id: #ty),
                Type::ImplTrait(_) | Type::TraitObject(_) => quote!(#id: &(#ty)),
                _ => quote!(#id: &#ty),
            },
            (Some(_), None) => unreachable!("typed parameters have a type"),
        })
        .collect();
    let write_body = key_writes(&params, Receiver::ByRef, &type_args, &impl_trait_args, true);
    let asyncness = sig.asyncness;
    let dot_await = is_async.then(|| quote!(.await));
    let companion_allows = quote! {
        #[doc(hidden)]
        #[allow(dead_code, unused_variables, clippy::needless_borrow, clippy::borrow_deref_ref, clippy::too_many_arguments, clippy::extra_unused_type_parameters, clippy::ptr_arg, clippy::unused_async)]
    };
    let companion_items = match companions {
        Companions::None => quote!(),
        Companions::Free => {
            let named_writes = write_call(true, true);
            let key_param_names: Vec<String> = params
                .iter()
                .filter(|p| !p.skipped)
                .filter_map(|p| p.ident.as_ref().map(Ident::to_string))
                .collect();
            let by_name_macro = format_ident!("__cache_companion_{}", fn_name);
            let fn_name_str = fn_name.to_string();
            quote! {
                #[doc(hidden)]
                #[allow(non_camel_case_types, dead_code)]
                #vis struct #fn_name {}

                #companion_allows
                impl #fn_name {
                    #[inline]
                    #vis fn __cache_descriptor() -> &'static ::cache_runtime::__private::Descriptor {
                        #descriptor_static
                        &__CACHE_DESCRIPTOR
                    }
                    #vis fn __cache_key #impl_generics (#same_params) -> ::cache_runtime::__private::CallKey #where_clause {
                        ::cache_runtime::__private::call_key(Self::__cache_descriptor(), #self_type, |__w: &mut ::cache_runtime::__private::KeyWriter| { #ref_writes })
                    }
                    #vis fn __cache_write #impl_generics (#(#write_params,)* __w: &mut ::cache_runtime::__private::KeyWriter) #where_clause {
                        #write_body
                    }
                    #vis fn __cache_key_named #impl_generics (#(#write_params),*) -> ::cache_runtime::__private::CallKey #where_clause {
                        ::cache_runtime::__private::call_key(Self::__cache_descriptor(), #self_type, |__w: &mut ::cache_runtime::__private::KeyWriter| { #named_writes })
                    }
                    #vis fn __cache_peek #impl_generics (#same_params) -> ::core::option::Option<#ret_ty> #where_clause {
                        ::cache_runtime::__private::peek::<#kind_path, _>(Self::__cache_descriptor(), #self_type, #ops, |__w: &mut ::cache_runtime::__private::KeyWriter| { #ref_writes })
                    }
                    #vis #asyncness fn __cache_refresh #impl_generics (#same_params) -> #ret_ty #where_clause {
                        ::cache_runtime::__private::refresh_next_call();
                        #fn_name #turbofish (#(#call_args),*) #dot_await
                    }
                }

                #[doc(hidden)]
                macro_rules! #by_name_macro {
                    ($($args:tt)*) => {
                        ::cache_runtime::__private::by_name! { target = #fn_name_str, key_params = [#(#key_param_names),*], $($args)* }
                    };
                }
                #[doc(hidden)]
                #[allow(unused_imports)]
                pub(crate) use #by_name_macro as #fn_name;
            }
        }
        Companions::Associated => {
            let key_fn = format_ident!("__cache_key_{}", fn_name);
            let write_fn_name = format_ident!("__cache_write_{}", fn_name);
            let peek_fn = format_ident!("__cache_peek_{}", fn_name);
            let refresh_fn = format_ident!("__cache_refresh_{}", fn_name);
            let receiver_call = if has_receiver {
                quote!(self.#fn_name #turbofish (#(#call_args),*))
            } else {
                quote!(Self::#fn_name #turbofish (#(#call_args),*))
            };
            quote! {
                #companion_allows
                #[inline]
                #vis fn #descriptor_fn() -> &'static ::cache_runtime::__private::Descriptor {
                    #descriptor_static
                    &__CACHE_DESCRIPTOR
                }
                #companion_allows
                #vis fn #write_fn_name #impl_generics (#(#write_params,)* __w: &mut ::cache_runtime::__private::KeyWriter) #where_clause {
                    #write_body
                }
                #companion_allows
                #vis fn #key_fn #impl_generics (#ref_receiver_params) -> ::cache_runtime::__private::CallKey #where_clause {
                    ::cache_runtime::__private::call_key(Self::#descriptor_fn(), #self_type, |__w: &mut ::cache_runtime::__private::KeyWriter| { #ref_writes })
                }
                #companion_allows
                #vis fn #peek_fn #impl_generics (#ref_receiver_params) -> ::core::option::Option<#ret_ty> #where_clause {
                    ::cache_runtime::__private::peek::<#kind_path, _>(Self::#descriptor_fn(), #self_type, #ops, |__w: &mut ::cache_runtime::__private::KeyWriter| { #ref_writes })
                }
                #companion_allows
                #vis #asyncness fn #refresh_fn #impl_generics (#same_params) -> #ret_ty #where_clause {
                    ::cache_runtime::__private::refresh_next_call();
                    #receiver_call #dot_await
                }
            }
        }
    };

    Ok(quote! {
        #wrapper
        #companion_items
    })
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
enum Companions {
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

/// How the receiver is available where a key is written.
#[derive(Clone, Copy, PartialEq)]
enum Receiver {
    /// As the function declares it (the wrapper).
    AsDeclared,
    /// As `&self` (companions).
    ByRef,
}

/// The statements writing a key: type arguments, then each argument.
/// With `named`, every parameter is a reference (the by-name companion).
fn key_writes(
    params: &[Param],
    receiver: Receiver,
    type_args: &[TokenStream],
    impl_trait_args: &[Ident],
    named: bool,
) -> TokenStream {
    let impl_trait_types = impl_trait_args.iter().map(|id| {
        if named {
            quote!(__w.type_arg(::core::any::type_name_of_val(#id));)
        } else {
            quote!(__w.type_arg(::core::any::type_name_of_val(&#id));)
        }
    });
    let writes = params.iter().map(|p| {
        if p.skipped {
            return quote!(__w.write_skipped(););
        }
        let span = p.span;
        let by_ref = p.is_ref || named || (p.ident.is_none() && receiver == Receiver::ByRef);
        let value = match (&p.ident, by_ref) {
            (None, true) => quote_spanned!(span=> self),
            (None, false) => quote_spanned!(span=> &self),
            (Some(id), true) => quote_spanned!(span=> #id),
            (Some(id), false) => quote_spanned!(span=> &#id),
        };
        quote_spanned!(span=> ::cache_runtime::__private::write_arg(__w, #value);)
    });
    quote! {
        #(#type_args)*
        #(#impl_trait_types)*
        __w.begin_args();
        #(#writes)*
    }
}

/// The parameters of a companion: the function's, with `mut` bindings dropped; with
/// `ref_receiver`, the receiver taken as `&self`.
fn companion_params(inputs: &Punctuated<FnArg, Token![,]>, ref_receiver: bool) -> TokenStream {
    let params = inputs.iter().map(|arg| match arg {
        FnArg::Receiver(r) if ref_receiver => {
            let _ = r;
            quote!(&self)
        }
        FnArg::Receiver(r) => r.to_token_stream(),
        FnArg::Typed(pt) => {
            let ty = &pt.ty;
            match &*pt.pat {
                Pat::Ident(pi) => {
                    let id = &pi.ident;
                    quote!(#id: #ty)
                }
                other => quote!(#other: #ty),
            }
        }
    });
    quote!(#(#params),*)
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

fn stored_type(ty: &Type, kind: &Kind) -> TokenStream {
    match kind {
        Kind::ResultOk => last_segment_args(ty, "Result")
            .and_then(|a| a.first().copied())
            .map_or_else(|| ty.to_token_stream(), ToTokens::to_token_stream),
        _ => ty.to_token_stream(),
    }
}
