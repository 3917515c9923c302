//! The wrapper: the function's new body. The hit path runs inline (`lookup`); the
//! original body runs only on the miss path (`run_async`, boxed, or `run_sync`).

use proc_macro2::TokenStream;
use quote::quote;

use super::parse::{CachedFn, Companions};
use super::{Common, Receiver};

pub(super) fn wrapper(f: &CachedFn, c: &Common) -> TokenStream {
    let func = &f.func;
    let ret_ty = &f.ret_ty;
    let (kind_path, desc_expr, ops, self_type) = (&c.kind_path, &c.desc_expr, &c.ops, &c.self_type);
    let stmts = &func.block.stmts;
    let block = &func.block;
    let writes = match f.companions {
        Companions::None => c.key_writes(&f.params, Receiver::AsDeclared, false),
        _ => {
            let receiver_is_ref = f.params.iter().any(|p| p.ident.is_none() && p.is_ref);
            c.write_call(f, receiver_is_ref, false)
        }
    };
    let body = quote! {
        move || async move {
            // Tells type inference what the block returns, so `?` works inside it.
            #[allow(unreachable_code, clippy::diverging_sub_expression, clippy::let_unit_value)]
            if false {
                let __cache_unreachable: #ret_ty = loop {};
                return __cache_unreachable;
            }
            #(#stmts)*
        }
    };
    // A hit returns at once, before anything of the miss path exists: the lookup's
    // result is a temporary of its statement, not part of the future's state. A hit
    // past the entry's eager-refresh point (functions whose body can run in the
    // background) also starts the refresh, with the body.
    let (hit, run) = if f.background {
        let hit = quote! {
            let (__cache_path, __cache_hit) = match ::cache_runtime::__private::lookup::<#kind_path, _, true>(
                #desc_expr,
                #self_type,
                __cache_ops,
                |__w: &mut ::cache_runtime::__private::KeyWriter| { #writes },
            ) {
                ::cache_runtime::__private::Lookup::Hit(__cache_value) => return __cache_value,
                ::cache_runtime::__private::Lookup::Refresh(__cache_value, __cache_path) => {
                    (::core::option::Option::Some(*__cache_path), ::core::option::Option::Some(__cache_value))
                }
                ::cache_runtime::__private::Lookup::Run(__cache_path) => (__cache_path, ::core::option::Option::None),
            };
            let __cache_body = #body;
            if let ::core::option::Option::Some(__cache_value) = __cache_hit {
                ::cache_runtime::__private::refresh_in_background::<#kind_path, _, _, _>(
                    __cache_path,
                    #desc_expr,
                    __cache_ops,
                    __cache_body,
                );
                return __cache_value;
            }
        };
        // The miss path is boxed: it holds the flight state and what makes the body's
        // future, and would otherwise make every call's future (hits included) as
        // large as both.
        let run = quote! {
            ::cache_runtime::__private::Box::pin(::cache_runtime::__private::run_async_background::<#kind_path, _, _, _>(
                __cache_path,
                #desc_expr,
                __cache_ops,
                __cache_body,
            )).await
        };
        (hit, run)
    } else {
        let hit = quote! {
            let __cache_path = match ::cache_runtime::__private::lookup::<#kind_path, _, false>(
                #desc_expr,
                #self_type,
                __cache_ops,
                |__w: &mut ::cache_runtime::__private::KeyWriter| { #writes },
            ) {
                ::cache_runtime::__private::Lookup::Hit(__cache_value) => return __cache_value,
                ::cache_runtime::__private::Lookup::Run(__cache_path) => __cache_path,
                // (never: see `lookup`'s `BACKGROUND`)
                ::cache_runtime::__private::Lookup::Refresh(__cache_value, _) => return __cache_value,
            };
        };
        let run = if f.is_async {
            quote! {
                ::cache_runtime::__private::Box::pin(::cache_runtime::__private::run_async::<#kind_path, _, _, _>(
                    __cache_path,
                    #desc_expr,
                    __cache_ops,
                    #body,
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
        (hit, run)
    };
    let local_descriptor =
        matches!(f.companions, Companions::None).then(|| c.descriptor_static.clone());
    let attrs = &func.attrs;
    let vis = &func.vis;
    let sig = &func.sig;
    quote! {
        #(#attrs)*
        #vis #sig {
            #local_descriptor
            let __cache_ops = #ops;
            #[allow(clippy::needless_borrow, clippy::borrow_deref_ref)]
            #hit
            #run
        }
    }
}
