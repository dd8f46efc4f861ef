/* The login screen: a name field, a Join button, the server's refusal next
 * to the field. What was typed survives every re-render. */
(function (ChatApp, Backbone) {
  'use strict';

  ChatApp.views.LoginView = Backbone.View.extend({
    className: 'login-screen',
    template: ChatApp.template('login-template'),

    events: {
      'submit #loginForm': 'submit',
      'input #nameInput': 'typed'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.listenTo(this.model, 'change:error change:busy', this.render);
    },

    render: function () {
      var typed = this.$('#nameInput').val();
      if (typed !== undefined) {
        this.model.set({ name: typed }, { silent: true });
      }
      this.$el.html(this.template(this.model.toJSON()));
      this.focus();
      return this;
    },

    // Called by the container once the view is in the document.
    shown: function () {
      this.focus();
    },

    focus: function () {
      var input = this.$('#nameInput').get(0);
      if (input && this.el.isConnected && !this.model.get('busy')) {
        input.focus();
        input.setSelectionRange(input.value.length, input.value.length);
      }
    },

    typed: function () {
      // The refusal was about the old text: stop showing it as invalid.
      this.$('#nameInput').removeClass('is-invalid');
    },

    submit: function (event) {
      event.preventDefault();
      if (this.model.get('busy')) {
        return;
      }
      // The server refuses spaces at either end of a name (look-alikes).
      this.vent.trigger('login', String(this.$('#nameInput').val() || '').trim());
    }
  });
})(ChatApp, Backbone);
