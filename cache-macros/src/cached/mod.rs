//! `#[cached]`: `parse.rs` checks the function, `wrapper.rs` generates its new body,
//! `companions.rs` the items that invalidation, `peek!` and `refresh!` call. What the
//! last two share (the descriptor, the key's writes, the value's operations) is built
//! once here.

mod companions;
mod parse;
mod wrapper;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{GenericParam, Ident, Type};

use crate::attr::Expiry;
use parse::{stored_type, CachedFn, Companions, Kind, Param};

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let f = parse::parse(args, item)?;
    let common = Common::new(&f);
    let wrapper = wrapper::wrapper(&f, &common);
    let companions = companions::companions(&f, &common);
    Ok(quote! {
        #wrapper
        #companions
    })
}

/// What the wrapper and the companions share.
struct Common {
    /// The `static` descriptor: key name, version, profile, expiration, `cache_none`.
    descriptor_static: TokenStream,
    /// Where the descriptor is reached from the wrapper.
    desc_expr: TokenStream,
    /// The receiver's type name, for methods keyed by it.
    self_type: TokenStream,
    /// The statements writing the type arguments into the key.
    type_args: Vec<TokenStream>,
    /// `impl Trait` parameters: anonymous generics, whose type is part of the key.
    impl_trait_args: Vec<Ident>,
    /// The value's operations, built at the return type's span.
    ops: TokenStream,
    kind_path: TokenStream,
    turbofish: TokenStream,
    /// The companion that writes the key, if there are companions.
    write_fn: Option<TokenStream>,
}

impl Common {
    fn new(f: &CachedFn) -> Self {
        let opts = &f.opts;
        let sig = &f.func.sig;
        let fn_name = &sig.ident;
        let name_expr = match &opts.name {
            Some(lit) => quote!(#lit),
            None if f.method => {
                let n = fn_name.to_string();
                quote!(#n)
            }
            None => {
                let n = fn_name.to_string();
                quote!(::core::concat!(::core::module_path!(), "::", #n))
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
        let duration = |d: &Option<(u64, Span)>| match d {
            None => quote!(::core::option::Option::None),
            Some((n, _)) => quote!(::core::option::Option::Some(
                ::cache_runtime::__private::Duration::from_nanos(#n)
            )),
        };
        let (fail_safe, fail_safe_throttle, soft_timeout) = (
            duration(&opts.fail_safe),
            duration(&opts.fail_safe_throttle),
            duration(&opts.soft_timeout),
        );
        let eager_refresh = match opts.eager_refresh {
            None => quote!(::core::option::Option::None),
            Some((f, _)) => quote!(::core::option::Option::Some(#f)),
        };
        let method = f.method;
        let background = f.background;
        let descriptor_static = quote! {
            static __CACHE_DESCRIPTOR: ::cache_runtime::__private::Descriptor = ::cache_runtime::__private::Descriptor {
                key_name: #name_expr,
                method: #method,
                version: #version,
                profile: #profile,
                expiration: #expiration,
                cache_none: #cache_none,
                overrides: ::cache_runtime::__private::Overrides {
                    fail_safe: #fail_safe,
                    fail_safe_throttle: #fail_safe_throttle,
                    soft_timeout: #soft_timeout,
                    eager_refresh: #eager_refresh,
                },
                background: #background,
                runtime: ::cache_runtime::__private::DescriptorRuntime::new(),
            };
        };
        let self_type = if f.method {
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
                    type_args.push(
                        quote!(__w.type_arg(::cache_runtime::__private::type_name::<#id>());),
                    );
                }
                GenericParam::Const(c) => {
                    let id = &c.ident;
                    type_args.push(quote!(__w.type_arg(&::std::format!("{}", #id));));
                }
                GenericParam::Lifetime(_) => {}
            }
        }
        let impl_trait_args = f
            .params
            .iter()
            .filter_map(|p| match (&p.ty, &p.ident) {
                (Some(Type::ImplTrait(_)), Some(id)) => Some(id.clone()),
                _ => None,
            })
            .collect();
        // Value checks, reported at the return type.
        let stored_ty = stored_type(&f.ret_ty, &f.kind);
        let ret_span = f.ret_ty.span();
        // Values of async functions may go to a remote tier: they must be serializable.
        let ops = if f.is_async && opts.local.is_none() {
            quote_spanned!(ret_span=> ::cache_runtime::__private::shared_ops::<#stored_ty>())
        } else {
            quote_spanned!(ret_span=> ::cache_runtime::__private::value_ops::<#stored_ty>())
        };
        let kind_path = match f.kind {
            Kind::Plain => quote!(::cache_runtime::__private::Plain),
            Kind::ResultOk => quote!(::cache_runtime::__private::ResultOk),
            Kind::Optional => quote!(::cache_runtime::__private::Optional),
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
        let names = companions::Names::of(f);
        let desc_expr = match (&f.companions, &names) {
            (Companions::Free, Some(n)) => {
                let d = &n.descriptor;
                quote!(#fn_name::#d())
            }
            (_, Some(n)) => {
                let d = &n.descriptor;
                quote!(Self::#d())
            }
            (_, None) => quote!(&__CACHE_DESCRIPTOR),
        };
        // With companions, the key is written by one companion function that the
        // wrapper and the other companions call, so a parameter without `CacheKey` is
        // reported once.
        let write_fn = names.map(|n| {
            let w = &n.write;
            match f.companions {
                Companions::Free => quote!(#fn_name::#w #turbofish),
                _ => quote!(Self::#w #turbofish),
            }
        });
        Common {
            descriptor_static,
            desc_expr,
            self_type,
            type_args,
            impl_trait_args,
            ops,
            kind_path,
            turbofish,
            write_fn,
        }
    }

    /// A call of the companion writing the key, from the wrapper (`receiver_is_ref`:
    /// `self` is a reference there) or from another companion (`params_are_refs`: the
    /// by-name companion's parameters are all references).
    fn write_call(
        &self,
        f: &CachedFn,
        receiver_is_ref: bool,
        params_are_refs: bool,
    ) -> TokenStream {
        let write_fn = self.write_fn.as_ref().expect("companions exist");
        let args = f
            .params
            .iter()
            .filter(|p| !p.skipped)
            .map(|p| match &p.ident {
                None if receiver_is_ref => quote!(self),
                None => quote!(&self),
                Some(id) if p.is_ref || params_are_refs => quote!(#id),
                Some(id) => quote!(&#id),
            });
        quote!(#write_fn(#(#args,)* __w);)
    }

    /// The statements writing a key (see [`key_writes`]).
    fn key_writes(&self, params: &[Param], receiver: Receiver, named: bool) -> TokenStream {
        key_writes(
            params,
            receiver,
            &self.type_args,
            &self.impl_trait_args,
            named,
        )
    }
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
